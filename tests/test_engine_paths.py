"""Every path users take runs exactly the method they named: the documented loops, BatchNorm, FlatPO's scope, the
relative rho floor, no host-device traffic inside a step, bounded memory, and older checkpoints."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import flatpeft

from conftest import loss_of, make_lora_mlp

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
KW = {"lr": 0.05, "total_steps": 6}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


# ---------------------------------------------------------------------------------- documented loops
def documented_loops() -> dict[str, str]:
    """The ``# loop: NAME`` Python blocks of docs/methods.md, without the lines that make up their example data."""
    text = DOCS.read_text(encoding="utf-8")
    loops = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first = block.splitlines()[0]
        if first.startswith("# loop:"):
            body = [ln for ln in block.splitlines()[1:] if not re.match(r"(loss_fn|batches|windows|device, use_fp16) = ", ln)]
            loops[first.split(":", 1)[1].strip()] = "\n".join(body)
    return loops


def test_docs_hold_the_three_loops():
    assert set(documented_loops()) == {"plain", "accumulation", "fp16"}


def run_closure(method, windows):
    model = make_lora_mlp(dropout=0.3)
    opt = flatpeft.create_optimizer(model, method, **KW)
    torch.manual_seed(3)
    for micro in windows:
        def closure(micro=micro):
            total = 0.0
            for x, y in micro:
                loss = nn.functional.cross_entropy(model(x), y) / len(micro)
                loss.backward()
                total = total + loss.detach()
            return total

        opt.zero_grad()
        opt.step(closure)
    return snapshot(model)


def run_snippet(method, name, windows, **extra):
    model = make_lora_mlp(dropout=0.3)
    opt = flatpeft.create_optimizer(model, method, **KW)
    code = documented_loops()[name]
    for old, new in extra.items():
        code = code.replace(old, new)
    ns = {"torch": torch, "nn": nn, "model": model, "opt": opt, "loss_fn": nn.functional.cross_entropy,
          "device": "cpu", "use_fp16": False}
    if name == "accumulation":
        ns["windows"] = windows
    else:
        ns["batches"] = [w[0] for w in windows]
    torch.manual_seed(3)
    exec(compile(code, f"docs/methods.md loop {name}", "exec"), ns)
    return snapshot(model)


@pytest.mark.parametrize("method", flatpeft.method_names())
@pytest.mark.parametrize("loop", ["plain", "accumulation", "fp16", "fp16-scaled"])
def test_documented_loops_equal_the_closure(method, loop):
    """Each documented loop, as written, equals step(closure) for every method (dropout on, so RNG replay counts)."""
    data = batches(6)
    if loop == "accumulation":
        windows = [data[0:2], data[2:4], data[4:6]]
    else:
        windows = [[b] for b in data[:3]]
    expected = run_closure(method, windows)
    if loop == "fp16-scaled":  # a real (power-of-two) loss scale on the CPU: exact, so still bit-equal
        got = run_snippet(method, "fp16", windows, **{"GradScaler(device, enabled=use_fp16)": "GradScaler(device, enabled=True)"})
    else:
        got = run_snippet(method, loop, windows)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14, msg=f"{method} {loop}: {k}")


@pytest.mark.parametrize("method", flatpeft.method_names())
def test_the_old_accumulation_fragment_cannot_add_a_stale_gradient(method):
    """flatpeft 0.1.0 documented: accumulate pass 1, first_step(), accumulate pass 2, second_step(). With a
    single-pass method that added the stale pass-1 gradient to the update (no error). first_step() now discards
    it, so the fragment gives every method its own step (no dropout here: the fragment replays no RNG)."""
    data = batches(4)
    windows = [data[0:2], data[2:4]]
    model_c = make_lora_mlp()
    opt_c = flatpeft.create_optimizer(model_c, method, **KW)
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, method, **KW)
    for micro in windows:
        def closure(micro=micro):
            for x, y in micro:
                (loss_of(model_c, x, y) / len(micro)).backward()

        opt_c.zero_grad()
        opt_c.step(closure)
        opt.zero_grad()
        for x, y in micro:
            (loss_of(model, x, y) / len(micro)).backward()
        opt.first_step()
        for x, y in micro:
            (loss_of(model, x, y) / len(micro)).backward()
        opt.second_step()
    expected, got = snapshot(model_c), snapshot(model)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14, msg=f"{method}: {k}")


def test_single_pass_first_step_discards_stale_gradients():
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "eflat-lora", total_steps=4)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.first_step()
    assert all(p.grad is None for p in opt.trainable)
    opt.restore()


# ------------------------------------------------------------------------------------------- BatchNorm
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.lin(x))))


@pytest.mark.parametrize("method", ["sam", "asam", "flatpo"])
def test_pass2_does_not_move_batchnorm_statistics(method):
    x, y = batches(1)[0]
    x = x.float()
    stats = {}
    for name, kw in [("base", {}), (method, {}), (method + "+stats", {"pass2_norm_stats": True})]:
        torch.manual_seed(0)
        model = BNNet()
        opt = flatpeft.create_optimizer(model, name.split("+")[0], lr=0.1, **kw)
        opt.zero_grad()
        opt.step(lambda: (lambda l: (l.backward(), l)[1])(nn.functional.cross_entropy(model(x), y)))
        stats[name] = (int(model.bn.num_batches_tracked), model.bn.running_mean.clone(), model.bn.track_running_stats)
    assert stats["base"][0] == 1 and stats[method][0] == 1
    assert torch.equal(stats[method][1], stats["base"][1])
    assert stats[method][2] is True  # switched back on after the step
    assert stats[method + "+stats"][0] == 2


# ------------------------------------------------------------------------------------------- FlatPO
def flatpo_step_displacement(scope):
    """One FlatPO step on a model whose head has the largest gradient; returns (pass-1 grad norms, displacement)."""
    model = make_lora_mlp(head_scale=0.05)  # a small head: small upstream gradients, the head the sharpest
    opt = flatpeft.create_optimizer(model, "flatpo", base_optimizer="sgd", lr=0.1, rho=0.1, fraction=0.25, scope=scope)
    x, y = batches(1)[0]
    before = snapshot(model)
    norms, disp = {}, {}
    for i in opt.gradient_passes():
        if i == 0:
            loss_of(model, x, y).backward()
            norms = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        else:
            disp = {n: (p.detach() - before[n]) for n, p in model.named_parameters() if p.requires_grad}
            loss_of(model, x, y).backward()
    opt.second_step()
    return norms, disp


def test_flatpo_ranks_adapters_only_by_default_even_when_the_head_is_sharpest():
    grads, disp = flatpo_step_displacement("adapters")
    gn = {n: float(g.norm()) for n, g in grads.items()}
    head = [n for n in gn if "modules_to_save" in n]
    adapters = [n for n in gn if ".lora_" in n]
    assert max(gn, key=gn.get) in head  # the head really is the sharpest tensor
    chosen = max(adapters, key=gn.get)  # k = max(1, floor(0.25 * 4)) = 1 adapter tensor
    moved = [n for n, d in disp.items() if float(d.abs().max()) > 0]
    assert moved == [chosen]
    norm_adapters = sum(float(grads[n].square().sum()) for n in adapters) ** 0.5
    torch.testing.assert_close(disp[chosen], 0.1 * grads[chosen] / (norm_adapters + 1e-12), rtol=1e-12, atol=1e-15)


def test_flatpo_scope_all_ranks_the_head():
    grads, disp = flatpo_step_displacement("all")
    gn = {n: float(g.norm()) for n, g in grads.items()}
    moved = [n for n, d in disp.items() if float(d.abs().max()) > 0]
    assert moved == [max(gn, key=gn.get)] and "modules_to_save" in moved[0]
    total = sum(float(g.square().sum()) for g in grads.values()) ** 0.5
    torch.testing.assert_close(disp[moved[0]], 0.1 * grads[moved[0]] / (total + 1e-12), rtol=1e-12, atol=1e-15)


def test_methods_listing_says_which_scope_is_default():
    table = flatpeft.optim.registry.methods_table(["flatpo", "spider"])
    assert "`scope`='adapters'" in table and "scope='all'" in table
    assert "`mask_scope`='pretrained'" in table


def test_docs_methods_table_is_the_registry():
    text = DOCS.read_text(encoding="utf-8")
    start, end = text.index("<!-- methods-table: begin -->"), text.index("<!-- methods-table: end -->")
    assert text[start:end].split("\n", 1)[1].strip() == flatpeft.optim.registry.methods_table(flatpeft.METHODS).strip(), (
        "docs/methods.md is out of date: run python scripts/methods_table.py")


# ------------------------------------------------------------------------------------------- rho floor
def rhos(opt, steps):
    out = []
    for t in range(steps + 1):
        opt._own["step"] = t
        out.append(opt.current_rho())
    return out


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.6])
def test_flat_lora_rho_floor_is_relative(rho):
    opt = flatpeft.create_optimizer(make_lora_mlp(), "flat-lora", rho=rho, total_steps=10)
    r = rhos(opt, 10)
    assert r[0] == pytest.approx(rho) and r[-1] == pytest.approx(0.4 * rho)
    assert all(a >= b for a, b in zip(r, r[1:]))  # decays, never grows


def test_rho_min_above_rho_is_refused():
    with pytest.raises(ValueError, match="rho_min"):
        flatpeft.create_optimizer(make_lora_mlp(), "flat-lora", rho=0.01, rho_min=0.02, total_steps=10)


def test_missing_total_steps_for_a_default_schedule_warns():
    with pytest.warns(UserWarning, match="total_steps"):
        flatpeft.create_optimizer(make_lora_mlp(), "flat-lora-random")


# ------------------------------------------------------------------------------------- no host traffic
class HostTraffic(TorchDispatchMode):
    """Records host reads of device values and host-to-device copies (parameters live on ``meta``)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if "_local_scalar_dense" in name or "item" in name:
            self.events.append(f"host read: {name}")
        if "copy" in name or "_to_copy" in name:
            devices = {t.device.type for t in tensors}
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target).type)
            if "cpu" in devices and "meta" in devices:
                self.events.append(f"cpu<->meta copy: {name}")
        return func(*args, **kwargs)


class HostConstants(torch.overrides.TorchFunctionMode):
    """Records ``torch.tensor`` / ``torch.as_tensor`` built on the host for another device: an implicit
    host-to-device copy that the dispatcher does not show."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type != "cpu":
                self.events.append(f"host tensor sent to {kwargs['device']}: {func.__name__}")
        return func(*args, **kwargs)


def meta_model():
    model = make_lora_mlp()
    return model.to("meta")


# Random draws need a generator on the parameters' device; the meta device has none.
NO_META = {"flat-lora-random"}


@pytest.mark.parametrize("method", [m for m in flatpeft.method_names() if m not in NO_META])
def test_a_step_has_no_host_device_traffic(method):
    model = meta_model()
    kw = {"fraction": 0.5} if method == "flatpo" else {}
    opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=0.1, total_steps=5, **kw)
    x = torch.randn(8, 6, dtype=torch.float64, device="meta")
    y = torch.zeros(8, dtype=torch.long, device="meta")

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)  # warm-up: constants (e.g. LoRA scales) may be built once
    mode, consts = HostTraffic(), HostConstants()
    with consts, mode:
        for _ in range(2):
            opt.zero_grad()
            opt.step(closure)
    assert mode.events + consts.events == [], mode.events + consts.events


def test_flatpo_random_selection_draws_on_the_parameters_device():
    from flatpeft.perturb.transforms import select_top_fraction
    from flatpeft.perturb.base import StepState

    dirs = [torch.ones(3, device="meta"), torch.ones(2, device="meta")]
    mode = HostTraffic()
    with pytest.raises((RuntimeError, NotImplementedError)):  # no generator exists on meta: nothing is drawn on the CPU
        with mode:
            select_top_fraction(0.5, "random").update(dirs, {}, StepState.of(dirs, rho=0.1, seed=1))
    assert not any("copy" in e for e in mode.events)


# ---------------------------------------------------------------------------------------------- memory
def test_flat_lora_random_never_writes_frozen_weights_and_holds_one_layer():
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "flat-lora-random", lr=0.1, total_steps=3)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    versions = {n: p._version for n, p in frozen.items()}
    x, y = batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: (lambda l: (l.backward(), l)[1])(loss_of(model, x, y)))
    assert {n: p._version for n, p in frozen.items()} == versions  # never written, not even restored
    largest = max(f.w0_matrix().numel() * 8 for f in opt.lora)  # float64 noise of the largest layer
    assert opt.memory_report() == {"persistent": 0, "transient": largest}
    assert float(opt.metrics["perturbation_norm"]) > 0


@pytest.mark.parametrize("method", flatpeft.METHODS)
def test_extra_memory_is_what_the_table_says(method):
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, method, lr=0.1, total_steps=3)
    x, y = batches(1)[0]
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: (lambda l: (l.backward(), l)[1])(loss_of(model, x, y)))
    rep = opt.memory_report()
    trainable = sum(p.numel() * 8 for p in opt.trainable)
    b_bytes = sum(f.B.numel() * 8 for f in opt.lora)
    head = sum(p.numel() * 8 for p, a in zip(opt.trainable, opt.adapters) if not a)
    adapters = sum(p.numel() * 8 for p, a in zip(opt.trainable, opt.adapters) if a)
    expected_persistent = {"eflat-lora": b_bytes, "spider": 3 * head, "flatpo-lagged": adapters}.get(method, 0)
    assert rep["persistent"] == expected_persistent
    if flatpeft.get_method(method).passes == 2:
        assert 0 < rep["transient"] <= trainable


# --------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["eflat-lora", "flatpo-lagged"])
def test_lagged_perturbation_is_held_once_and_resumes_exactly(method):
    """The lagged perturbation of EFlat-LoRA / flatpo-lagged *is* the EMA buffer (no second copy in the state); a
    state dict saved after two steps, through torch.save / torch.load, continues exactly like the uninterrupted
    run."""
    data = batches(4)
    ref, model = make_lora_mlp(), make_lora_mlp()
    o_ref = flatpeft.create_optimizer(ref, method, **KW)
    opt = flatpeft.create_optimizer(model, method, **KW)
    for i, (x, y) in enumerate(data):
        for m, o in ((ref, o_ref), (model, opt)) if i < 2 else ((ref, o_ref),):
            o.zero_grad()
            o.step(lambda m=m: (lambda l: (l.backward(), l)[1])(loss_of(m, x, y)))
    sd = opt.state_dict()
    entries = [v for v in sd["state"].values() if "flatpeft.ema" in v]
    assert entries and not any("flatpeft.lagged" in v for v in sd["state"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = make_lora_mlp(seed=9)
    fresh.load_state_dict(model.state_dict())
    opt2 = flatpeft.create_optimizer(fresh, method, **KW)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for x, y in data[2:]:
        opt2.zero_grad()
        opt2.step(lambda: (lambda l: (l.backward(), l)[1])(loss_of(fresh, x, y)))
    for n, p in ref.named_parameters():
        assert torch.equal(p, dict(fresh.named_parameters())[n]), n


# ------------------------------------------------------------------------------------ plain parameters
def test_create_optimizer_accepts_parameters_and_groups():
    model = make_lora_mlp()
    ps = [p for p in model.parameters() if p.requires_grad]
    opt = flatpeft.create_optimizer(ps, "sam", lr=0.1)
    assert len(opt.trainable) == len(ps)
    opt = flatpeft.create_optimizer([{"params": ps[:2], "lr": 0.2}, {"params": ps[2:]}], "flatpo", lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    with pytest.raises(ValueError, match="needs the model"):
        flatpeft.create_optimizer(ps, "flat-lora")


def test_hand_written_lora_module_is_found():
    class LoRALinear(nn.Module):
        def __init__(self, n_in, n_out, r=2):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_out, n_in), requires_grad=False)
            self.lora_A = nn.Parameter(torch.randn(r, n_in) * 0.1)
            self.lora_B = nn.Parameter(torch.randn(n_out, r) * 0.1)
            self.scaling = 2.0

        def forward(self, x):
            return x @ self.weight.t() + self.scaling * (x @ self.lora_A.t()) @ self.lora_B.t()

    model = nn.Sequential(LoRALinear(6, 5), nn.Tanh(), LoRALinear(5, 3))
    opt = flatpeft.create_optimizer(model, "flat-lora", lr=0.1, total_steps=3)
    assert len(opt.lora) == 2 and all(opt.adapters)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    opt.step(lambda: (lambda l: (l.backward(), l)[1])(nn.functional.cross_entropy(model(x), y)))


def test_flatpeft_methods_command_says_the_default_scope():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "flatpeft", "methods"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("flatpo "))
    assert "scope='adapters'" in line and "2 passes" in line
    assert "ranks: PEFT adapter tensors (scope='adapters', default)" in out.stdout
    assert "rho_min=0.4*rho" in out.stdout


def test_unregister_method():
    from flatpeft.optim.registry import unregister_method

    flatpeft.register_method(flatpeft.MethodInfo("tmp-method", lambda: []))
    assert "tmp-method" in flatpeft.method_names()
    unregister_method("tmp-method")
    assert "tmp-method" not in flatpeft.method_names()
    with pytest.raises(ValueError, match="built in"):
        unregister_method("sam")


def test_a_registered_method_runs_by_name_from_an_experiment_config(tmp_path):
    """conftest registers ``test-custom``; the config's ``method.name`` reaches it (validation and a real run)."""
    pytest.importorskip("pandas")
    import _fixtures as F
    from flatpeft.experiments import train_run
    from flatpeft.experiments.runner import validate_config

    cfg = F.tiny_config(tmp_path, method={"name": "test-custom", "rho": 0.1, "fraction": 0.5}, train={"steps": 2})
    validate_config(cfg)
    metrics = train_run(cfg, seed=0, out_dir=tmp_path / "run", progress=False)
    assert "accuracy" in metrics


def test_spider_says_when_its_default_scope_masks_nothing():
    """On a pure-LoRA model SPIDER's default scope has no pre-trained tensor to mask: it warns once and its steps
    are exactly the base optimizer's; with a trained head (or mask_scope='all') it masks and does not warn."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from conftest import MLP

    def pure_lora():
        torch.manual_seed(0)
        return get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"])).double()

    x = torch.randn(8, 6, dtype=torch.float64)

    def run(model, method, **kw):
        opt = flatpeft.create_optimizer(model, method, lr=0.05, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                opt.step(lambda: (lambda l: (l.backward(), l)[1])(model(x).square().mean()))
        return [w for w in caught if "masks nothing" in str(w.message)]

    spider, base = pure_lora(), pure_lora()
    assert len(run(spider, "spider")) == 1                       # once, not every step
    run(base, "base")
    for (n, p), q in zip(spider.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n
    assert run(pure_lora(), "spider", mask_scope="all") == []
    assert run(make_lora_mlp(), "spider") == []                  # the trained head is masked
