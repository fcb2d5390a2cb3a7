"""The engine under real conditions (issue 17): ill-conditioned LoRA factors, exact r x r solves, adapters without
gradients, factors missing from the optimizer, several active adapters, metrics on reuse steps.

Each test states the maths it checks and derives its expectation independently (float64 pseudo-inverses, counts,
variances), not from the engine's own helpers.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatpeft
from flatpeft.perturb.transforms import full_space_lora_perturbation

pytestmark = pytest.mark.usefixtures("single_thread")


class Two(nn.Module):
    """Two 16 x 16 linear layers (LoRA targets ``q`` and ``v``) and a 3-way head."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.v(torch.tanh(self.q(x)))))


def ill_conditioned_lora(seed: int = 0, dtype=torch.float32):
    """A float32 peft LoRA (r = 4 on q, v) whose ``v`` factor ``B`` has singular values 4e-3, 2e-3, 5.8e-8, 2.4e-9:
    the conditioning seen after the first AdamW step of a real SFT run (issue 17)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Two(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "v.lora_B" in name:
                u, _ = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))
                w, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
                p.copy_((u * torch.tensor([4e-3, 2e-3, 5.8e-8, 2.4e-9], dtype=torch.float64)) @ w.T)
            elif "q.lora_B" in name:
                p.copy_(1e-3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def realised_radius(opt, clean_b) -> float:
    """``sqrt(sum_l ||s (B_l - B_l^clean) A_l||^2)`` in float64 from the weights as they are now (perturbed)."""
    total = 0.0
    for f in opt.lora:
        delta = (f.B.detach().double() - clean_b[f.name]) @ f.A.detach().double()
        total += float((f.scale * delta).square().sum())
    return math.sqrt(total)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 16, generator=g), torch.randint(0, 3, (32,), generator=g)


@pytest.mark.parametrize("method", ["flat-lora", "eflat-lora"])
def test_full_space_radius_never_exceeds_rho_on_ill_conditioned_float32_factors(method):
    """The W-space step ``s E_B A`` realised by moving B has norm <= rho_t (here a constant radius), for the
    two-pass step and for every step of the lagged EMA, although ``B`` of ``v`` is numerically rank 2."""
    model = ill_conditioned_lora()
    x, y = batch()
    rho = 0.05
    # lr 0: the factors keep their conditioning; EFlat-LoRA's EMA still accumulates its perturbations
    opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=0.0, rho=rho, rho_schedule="constant")
    radii = []
    for _ in range(6):
        opt.zero_grad()
        clean_b = {f.name: f.B.detach().double().clone() for f in opt.lora}
        for _ in opt.gradient_passes():
            nn.functional.cross_entropy(model(x), y).backward()
            radii.append(realised_radius(opt, clean_b))
        opt.second_step()
    assert max(radii) <= rho * (1 + 1e-6), radii
    assert max(radii) > 0.2 * rho  # and it is a real step, not a vanishing one
    if method == "eflat-lora":
        assert float(opt.metrics["perturbation_radius"]) <= rho * (1 + 1e-6)


def pinv_reference(a, b, ga, gb, s):
    """Flat-LoRA's ``E_B`` and ``||G_hat||`` from explicit float64 pseudo-inverses (the paper's formulas)."""
    ghat = 0.5 * (gb @ torch.linalg.pinv(a.T) / s + torch.linalg.pinv(b.T) @ ga / s)
    n = ghat.norm()
    return (ghat / n) @ torch.linalg.pinv(a) / s, n


@pytest.mark.parametrize("cond, tol", [(1e3, 1e-9), (1e4, 1e-7)])
def test_full_space_solves_equal_the_pseudo_inverse_for_ill_conditioned_full_rank_a(cond, tol):
    """With the default damping the r x r solves equal the exact pseudo-inverse formulas in float64 when ``A`` is
    full rank, also with cond(A) = 1e3 / 1e4 (a relative damping of 1e-6 was off by 6 % / 15 % there)."""
    g = torch.Generator().manual_seed(0)
    n, m, r, s = 16, 24, 4, 2.0
    ua, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    a = 0.3 * (ua * torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)).T
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    big_g = torch.randn(n, m, generator=g, dtype=torch.float64)
    ga, gb = s * b.T @ big_g, s * big_g @ a.T
    eb_ref, n_ref = pinv_reference(a, b, ga, gb, s)
    eb, nsq = full_space_lora_perturbation(a[None], b[None], ga[None], gb[None], torch.tensor([s], dtype=torch.float64))
    assert float((nsq[0].sqrt() - n_ref).abs() / n_ref) < tol
    assert float((eb[0] / nsq[0].sqrt() - eb_ref).norm() / eb_ref.norm()) < tol


class Square(nn.Module):
    """Two 4 x 4 linear layers: with LoRA r = 4 both factors are square, so ``P_row(A) = P_col(B) = I``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.q(x))


def cancelling_grads(opt, seed: int) -> None:
    """Gradients whose two full-space estimates nearly cancel on ``q`` (``G_1 = G``, ``G_2 = -(G + D)``, so
    ``G_hat = -D / 2`` with ``||D|| = 1e-4 ||G||``) and are tiny on ``v``: the float32 trace identity
    ``||G_1||^2 + ||G_2||^2 + 2 <G_1, G_2>`` then cancels to round-off, and a wrong per-layer norm shows up as a
    realised radius far above rho."""
    g = torch.Generator().manual_seed(seed)
    for f in opt.lora:
        a, b = f.A.detach().double(), f.B.detach().double()
        big = torch.randn(4, 4, generator=g, dtype=torch.float64)
        if f.name.startswith("base_model.model.q"):
            d = 1e-4 * big.norm() * torch.randn(4, 4, generator=g, dtype=torch.float64) / 4
            gb, ga = f.scale * big @ a.T, -f.scale * b.T @ (big + d)
        else:
            gb, ga = 1e-9 * f.scale * big @ a.T, 1e-9 * f.scale * b.T @ big
        f.A.grad, f.B.grad = ga.to(f.A.dtype), gb.to(f.B.dtype)


@pytest.mark.parametrize("method", ["flat-lora", "eflat-lora"])
def test_full_space_radius_bound_survives_cancelling_float32_estimates(method):
    from peft import LoraConfig, get_peft_model

    rho = 0.05
    worst = 0.0
    for seed in range(8):
        torch.manual_seed(seed)
        model = get_peft_model(Square(), LoraConfig(r=4, lora_alpha=4, target_modules=["q", "v"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p))
        opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=0.0, rho=rho, rho_schedule="constant")
        for _ in range(3):
            opt.zero_grad()
            clean_b = {f.name: f.B.detach().double().clone() for f in opt.lora}
            if method == "flat-lora":
                cancelling_grads(opt, seed)
                opt.first_step()
                worst = max(worst, realised_radius(opt, clean_b))
                cancelling_grads(opt, seed)
            else:
                for _ in opt.gradient_passes():
                    worst = max(worst, realised_radius(opt, clean_b))
                    cancelling_grads(opt, seed)
            opt.second_step()
    assert 0.1 * rho < worst <= rho * (1 + 1e-6)


class Four(nn.Module):
    """Four 4 x 4 layers of which the forward pass uses three: LoRA on all four gives 8 adapter tensors, 2 of them
    without a gradient (an unused layer, an unrouted expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


def four_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Four(), LoraConfig(r=2, lora_alpha=2, target_modules=["l0", "l1", "l2", "l3"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("method, kw", [("flatpo", {}), ("flatpo", {"ascent_every": 2}),
                                        ("flatpo-lagged", {}), ("flatpo-lagged", {"refresh_every": 2})])
def test_flatpo_counts_k_over_adapters_with_a_gradient_on_every_path(method, kw):
    """8 adapter tensors, 6 with a gradient, fraction 0.25: k = floor(0.25 * 6) = 1 on every path and every step
    (reuse steps report the selection they reuse), and the unused layer is never selected."""
    model = four_lora()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=0.1, rho=0.05, fraction=0.25, **kw)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: model(x).square().mean().backward())
        selected = opt.metrics["selected"]
        assert float(selected.sum()) == 1.0
        assert "grad_norm" in opt.metrics
        chosen = [n for n, m in zip(names, selected.tolist()) if m]
        assert chosen and ".l3." not in chosen[0]


@pytest.mark.parametrize("method, left_out", [("nbar", "lora_A"), ("obar", "lora_A"), ("eflat-lora", "lora_B"),
                                              ("flat-lora", "lora_B")])
def test_a_lora_factor_left_out_of_the_optimizer_is_named_at_construction(method, left_out):
    model = four_lora()
    kept = [p for n, p in model.named_parameters() if p.requires_grad and left_out not in n]
    with pytest.raises(ValueError, match=rf"{left_out}.*not among the optimizer's parameters"):
        flatpeft.create_optimizer(model, method, params=kept)


def test_flat_lora_random_adds_one_noise_per_module_with_two_active_adapters():
    """Li et al.'s noise is on the frozen W0 of a module: ``E ||eps||^2 = sum_i m sigma_i^2 = rho^2 ||W||_F^2`` for the
    merged ``W = W0 + sum_k s_k B_k A_k``, however many adapters are active (one noise per adapter gave 1.5-2x)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    layer = model.base_model.model[0]
    merged = layer.base_layer.weight.detach().double() + sum(
        layer.scaling[k] * layer.lora_B[k].weight.detach().double() @ layer.lora_A[k].weight.detach().double() for k in ("a", "b"))
    rho = 0.5
    opt = flatpeft.create_optimizer(model, "flat-lora-random", base_optimizer="sgd", lr=0.0, rho=rho)
    x = torch.randn(8, 64)
    ratios = []
    for _ in range(4):
        opt.zero_grad()
        opt.step(lambda: model(x).square().mean().backward())
        ratios.append(float(opt.metrics["perturbation_norm"]) ** 2 / (rho**2 * float(merged.square().sum())))
    assert all(0.9 < r < 1.1 for r in ratios), ratios


def test_flat_lora_random_keep_noise_gives_the_same_training():
    """``keep_noise=True`` draws each layer's noise once per step instead of again in the backward pass and for
    every micro-batch: the same noise, so the same weights bit for bit; it holds every layer's noise meanwhile."""
    from conftest import make_lora_mlp

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    weights, held = {}, {}
    for keep in (False, True):
        model = make_lora_mlp()
        opt = flatpeft.create_optimizer(model, "flat-lora-random", base_optimizer="sgd", lr=0.1, rho=0.3,
                                        keep_noise=keep)
        for _ in range(3):
            opt.zero_grad()
            for _ in opt.gradient_passes():
                for half in x.split(8):  # two micro-batches
                    (model(half).square().mean() / 2).backward()
            opt.second_step()
        weights[keep] = [p.detach().clone() for p in model.parameters()]
        held[keep] = opt.memory_report()["transient"]
    for a, b in zip(weights[False], weights[True]):
        assert torch.equal(a, b)
    assert held[True] > held[False] > 0


def test_flat_lora_random_keeps_an_accelerate_hook_on_the_base_layer():
    """A base layer whose forward accelerate wrapped (device maps, offload) keeps its hook during and after a
    step: the noise then goes through the output hook, and the layer's own forward is never replaced or deleted."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from peft import LoraConfig, get_peft_model

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                           LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0].base_layer
    add_hook_to_module(layer, Count())
    opt = flatpeft.create_optimizer(model, "flat-lora-random", base_optimizer="sgd", lr=1e-2, rho=0.05)
    x = torch.randn(3, 4)
    opt.zero_grad()
    opt.step(lambda: model(x).square().mean().backward())
    assert Count.calls == 1 and float(opt.metrics["perturbation_norm"]) > 0
    model(x)
    assert Count.calls == 2 and "forward" in vars(layer)


def test_spider_scores_tensors_on_several_devices():
    """SPIDER's one code path keeps per-tensor statistics on each tensor's device (a model split over devices;
    ``meta`` stands in for a second device here): the result on each device equals scoring it alone."""
    from flatpeft.methods.spider import ImportanceMask, psi, psi_all

    g = torch.Generator().manual_seed(0)
    cpu = torch.randn(3, 4, generator=g)
    xs = [cpu, torch.randn(5, 2, device="meta")]
    out = psi_all(xs, xs)
    assert out[1].device.type == "meta" and torch.equal(out[0], psi(cpu))
    coefs = ImportanceMask.coefficients_all([psi(cpu), out[1]], [psi(2 * cpu.square()), out[1]], xs)
    assert coefs[1].device.type == "meta"
    assert torch.equal(coefs[0], ImportanceMask.coefficients(psi(cpu), psi(2 * cpu.square())))


def _sgd_sam(model, base=None):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    kw = {"base_optimizer": base} if base is not None else {"lr": 1e-2}
    opt = flatpeft.create_optimizer(model, "sam", ascent_every=2, **kw)
    opt.zero_grad()
    opt.step(lambda: model(x).square().mean().backward())
    return opt


def test_base_optimizer_state_dict_overrides_and_hooks_run():
    """flatpeft's state travels through torch's state-dict hooks, but the base optimizer still saves and loads
    itself: its own ``state_dict`` / ``load_state_dict`` (an 8-bit optimizer's) and its hooks run."""
    calls = []

    class MyAdam(torch.optim.Adam):
        def state_dict(self):
            calls.append("state_dict")
            return {**super().state_dict(), "extra": 42}

        def load_state_dict(self, sd):
            calls.append("load_state_dict")
            self.extra = sd.pop("extra")
            super().load_state_dict(sd)

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    base = MyAdam(model.parameters(), lr=1e-2)
    base.register_load_state_dict_post_hook(lambda o: calls.append("base load hook"))
    opt = _sgd_sam(model, base)
    sd = opt.state_dict()
    assert sd["extra"] == 42 and any("flatpeft.ascent" in v for v in sd["state"].values())
    opt.load_state_dict(sd)
    assert calls == ["state_dict", "load_state_dict", "base load hook"] and base.extra == 42
    assert opt.state is base.state and opt.param_groups is base.param_groups and opt.step_count == 1


def test_pre_release_checkpoint_layout_is_refused_by_name():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    sd = _sgd_sam(model).base_optimizer.state_dict()
    sd["state"]["flatpeft"] = {"step": 7, "buffers": {}}
    fresh = flatpeft.create_optimizer(model, "sam", lr=1e-2, ascent_every=2)
    with pytest.raises(ValueError, match=r"state\['flatpeft'\]; it is no longer read"):
        fresh.load_state_dict(sd)


FLATTENED = r"""
import os, sys, torch, flatpeft
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict, StateDictOptions
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
flat = sys.argv[1] == "1"
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
x, y = torch.randn(16, 4), torch.randn(16, 2)
def run(opt, m, n):
    for _ in range(n):
        opt.zero_grad()
        opt.step(lambda: ((m(x) - y) ** 2).mean().backward())
m = model(); opt = flatpeft.create_optimizer(m, "sam", lr=1e-2, ascent_every=2)
run(opt, m, 3)
import copy  # a state dict holds the optimizer's own tensors: copy it, as a checkpoint on disk would
osd = copy.deepcopy(get_optimizer_state_dict(m, opt, options=StateDictOptions(flatten_optimizer_state_dict=flat)))
m2 = model(); m2.load_state_dict(m.state_dict())
opt2 = flatpeft.create_optimizer(m2, "sam", lr=1e-2, ascent_every=2)
try:
    set_optimizer_state_dict(m2, opt2, osd, options=StateDictOptions(flatten_optimizer_state_dict=flat))
except ValueError as err:
    print("REFUSED", err)
    sys.exit(3)
run(opt, m, 2); run(opt2, m2, 2)
print("EQUAL", all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters())))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("flat", [False, True])
def test_flattened_distributed_checkpoint_is_refused_not_silently_reset(tmp_path, flat):
    """``torch.distributed.checkpoint`` with ``flatten_optimizer_state_dict=True`` keeps only the keys of the live
    optimizer state, which dropped flatpeft's buffers and step counter without a word (the run restarted its
    schedules and EMAs). The loss is now refused naming the option; the unflattened route resumes exactly."""
    import subprocess
    import sys

    script = tmp_path / "flat.py"
    script.write_text(FLATTENED)
    port = str(29600 + int(flat))
    res = subprocess.run([sys.executable, str(script), "1" if flat else "0", port], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if flat:
        assert res.returncode == 3 and "flatten_optimizer_state_dict=False" in res.stdout, res.stdout + res.stderr
    else:
        assert res.returncode == 0 and "EQUAL True" in res.stdout, res.stdout + res.stderr
