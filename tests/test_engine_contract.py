"""Contract tests of the engine over every registered method (the live registry, so a method registered with
``register_method`` -- such as conftest's ``test-custom`` -- is covered without editing this file): API parity,
resume, restore, robustness."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import flatpeft
from flatpeft.perturb.base import StepState
from flatpeft.methods.spider import ImportanceMask, psi
from flatpeft.perturb.transforms import full_space_lora_perturbation, lora_full_space

from conftest import loss_of, make_closure, make_lora_mlp, make_mlp

KW = {"lr": 0.05, "total_steps": 6}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14, msg=k)


def batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", flatpeft.method_names())
def test_closure_equals_two_call_api(method):
    data = batches(4)
    m1, m2 = make_lora_mlp(), make_lora_mlp()
    o1 = flatpeft.create_optimizer(m1, method, **KW)
    o2 = flatpeft.create_optimizer(m2, method, **KW)
    for x, y in data:
        o1.zero_grad()
        o1.step(make_closure(m1, x, y))
        o2.zero_grad()
        if o2.passes == 2:
            loss_of(m2, x, y).backward()
        o2.first_step()
        loss_of(m2, x, y).backward()
        o2.second_step()
    assert_same(snapshot(m1), snapshot(m2))


@pytest.mark.parametrize("method", flatpeft.method_names())
def test_state_dict_resume_equals_uninterrupted(method):
    data = batches(6)
    ref = make_lora_mlp()
    o_ref = flatpeft.create_optimizer(ref, method, **KW)
    for x, y in data:
        o_ref.zero_grad()
        o_ref.step(make_closure(ref, x, y))

    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, method, **KW)
    for x, y in data[:3]:
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    fresh = make_lora_mlp(seed=99)  # different init: everything must come from the checkpoint
    fresh.load_state_dict(ckpt["model"])
    opt2 = flatpeft.create_optimizer(fresh, method, **KW)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 3
    for x, y in data[3:]:
        opt2.zero_grad()
        opt2.step(make_closure(fresh, x, y))
    assert_same(snapshot(ref), snapshot(fresh))


@pytest.mark.parametrize("method", flatpeft.method_names())
def test_frozen_weights_bit_identical_and_params_clean_after_exception(method):
    x, y = batches(1)[0]
    model = make_lora_mlp()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = flatpeft.create_optimizer(model, method, **KW)
    for _ in range(3):
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n

    before = snapshot(model)
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == opt.passes:  # fail in the pass that runs at the perturbed point
            raise KeyboardInterrupt("user pressed Ctrl-C")
        return make_closure(model, x, y)()

    opt.zero_grad()
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert_same(snapshot(model), before)
    # the optimizer is still usable afterwards
    opt.zero_grad()
    opt.step(make_closure(model, x, y))


TWO_PASS = [m for m in flatpeft.method_names() if flatpeft.get_method(m).passes == 2]


def test_passes_come_from_the_rules():
    for m in flatpeft.method_names():
        assert flatpeft.get_method(m).passes == flatpeft.create_optimizer(make_lora_mlp(), m, total_steps=4).passes
    assert {m for m in TWO_PASS if m in flatpeft.METHODS} == {"sam", "asam", "flat-lora", "flatpo"}


@pytest.mark.parametrize("method", TWO_PASS)
def test_non_finite_ascent_gradient_is_skipped(method):
    """A NaN pass-1 gradient gives e = 0: the update equals the plain step with the pass-2 gradient at w."""
    x, y = batches(1)[0]
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=0.1)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = loss_of(model, x, y)
        (loss * (float("nan") if calls["n"] == 1 else 1.0)).backward()
        return loss

    expected_model = make_lora_mlp()
    ref = flatpeft.create_optimizer(expected_model, "base", base_optimizer="sgd", lr=0.1)
    ref.zero_grad()
    ref.step(make_closure(expected_model, x, y))
    opt.zero_grad()
    opt.step(closure)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert_same(snapshot(model), snapshot(expected_model), exact=False)
    assert float(opt.metrics["perturbation_norm"]) == 0.0


def test_eflat_ema_ignores_non_finite_gradients():
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "eflat-lora", rho=0.1)
    for f in opt.lora:
        f.A.grad = torch.full_like(f.A, float("inf"))
        f.B.grad = torch.full_like(f.B, float("nan"))
    step = opt.step_state().on("lora_B", with_grad_only=False)
    out, _ = lora_full_space().update([f.B.grad for f in opt.lora], {}, step)
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


# ------------------------------------------------------------------------------------------- FlatPO
def count_changed_during_pass2(method_kwargs, granularity):
    x, y = batches(1)[0]
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "flatpo", granularity=granularity, **method_kwargs)
    before = snapshot(model)
    seen = {}

    def closure():
        if not seen and opt._perturbed:
            seen.update(snapshot(model))
        return make_closure(model, x, y)()

    opt.zero_grad()
    opt.step(closure)
    changed = {k: (seen[k] != before[k]) for k in before}
    return changed, opt


@pytest.mark.parametrize("fraction, k", [(0.05, 1), (0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_flatpo_perturbs_exactly_k_tensors(fraction, k):
    changed, opt = count_changed_during_pass2({"fraction": fraction}, "tensor")
    assert sum(bool(v.any()) for v in changed.values()) == k
    # the chosen tensors are the ones with the largest gradient norms of pass 1
    assert int(opt.metrics["selected"].sum()) == k


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3])
def test_flatpo_perturbs_exactly_k_elements(fraction):
    changed, _ = count_changed_during_pass2({"fraction": fraction}, "element")
    total = sum(v.numel() for k, v in changed.items() if "lora" in k)
    assert sum(int(v.sum()) for v in changed.values()) == max(1, math.floor(fraction * total))


def test_flatpo_random_selection_reproducible_from_seed():
    def run(seed):
        model = make_lora_mlp()
        opt = flatpeft.create_optimizer(model, "flatpo", fraction=0.25, selection="random", seed=seed, lr=0.05)
        picks = []
        for x, y in batches(6):
            opt.zero_grad()
            opt.step(make_closure(model, x, y))
            picks.append(tuple(opt.metrics["selected"].tolist()))
        return picks, snapshot(model)

    a, wa = run(3)
    b, wb = run(3)
    c, _ = run(4)
    assert a == b
    assert_same(wa, wb)
    assert a != c
    assert all(sum(p) == 1 for p in a)
    assert len(set(a)) > 1  # redrawn every step


def test_flatpo_normalize_over_selected_has_radius_rho():
    x, y = batches(1)[0]
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "flatpo", fraction=0.5, rho=0.3, normalize_over="selected")
    opt.zero_grad()
    opt.step(make_closure(model, x, y))
    assert float(opt.metrics["perturbation_norm"]) == pytest.approx(0.3, rel=1e-9)
    model2 = make_lora_mlp()
    opt2 = flatpeft.create_optimizer(model2, "flatpo", fraction=0.5, rho=0.3)
    opt2.zero_grad()
    opt2.step(make_closure(model2, x, y))
    assert float(opt2.metrics["perturbation_norm"]) < 0.3  # global norm: radius rho ||g_S|| / ||g||


# ----------------------------------------------------------------------------- Flat-LoRA closed forms
def pinv_reference(a, b, ga, gb, s):
    g1 = gb @ torch.linalg.pinv(a.T) / s
    g2 = torch.linalg.pinv(b.T) @ ga / s
    ghat = 0.5 * (g1 + g2)
    n = ghat.norm()
    eb = (ghat / n) @ torch.linalg.pinv(a) / s
    return eb, n


@pytest.mark.parametrize("case", ["generic", "b_zero", "a_rank_deficient"])
def test_full_space_closed_forms_equal_pseudo_inverse_formulas(case):
    g = torch.Generator().manual_seed(0)
    n, m, r, s = 7, 9, 3, 1.7
    a = torch.randn(r, m, generator=g, dtype=torch.float64)
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    big_g = torch.randn(n, m, generator=g, dtype=torch.float64)
    if case == "b_zero":
        b = torch.zeros(n, r, dtype=torch.float64)
    if case == "a_rank_deficient":
        a = torch.randn(r, 1, generator=g, dtype=torch.float64) @ torch.randn(1, m, generator=g, dtype=torch.float64)
    ga, gb = s * b.T @ big_g, s * big_g @ a.T  # the LoRA chain rule
    eb_ref, n_ref = pinv_reference(a, b, ga, gb, s)
    # Tiny damping is exact for full-rank factors; for an exactly rank-deficient A the round-off that leaks into
    # A's null space is amplified by ~eps/damping, so that case is checked at a moderate damping.
    dampings = ((1e-8, 1e-6), (1e-6, 1e-4)) if case == "a_rank_deficient" else ((1e-13, 1e-8), (1e-6, 1e-4))
    for damping, tol in dampings:
        eb, nsq = full_space_lora_perturbation(a[None], b[None], ga[None], gb[None], torch.tensor([s], dtype=torch.float64), damping)
        torch.testing.assert_close(nsq[0].sqrt(), n_ref, rtol=tol, atol=1e-12)
        torch.testing.assert_close(eb[0] / nsq[0].sqrt(), eb_ref, rtol=tol, atol=tol * float(eb_ref.abs().max()))
    if case == "b_zero":  # G_hat = G P_row(A) / 2 and the realised W-space step has radius exactly 1
        p_row = torch.linalg.pinv(a) @ a
        torch.testing.assert_close(n_ref, 0.5 * (big_g @ p_row).norm())
        torch.testing.assert_close((s * eb_ref @ a).norm(), torch.tensor(1.0, dtype=torch.float64))


def test_full_space_batched_equals_per_layer_and_float32_is_close():
    g = torch.Generator().manual_seed(1)
    L, n, m, r = 4, 6, 5, 2
    a = torch.randn(L, r, m, generator=g, dtype=torch.float64)
    b = torch.randn(L, n, r, generator=g, dtype=torch.float64)
    ga = torch.randn(L, r, m, generator=g, dtype=torch.float64)
    gb = torch.randn(L, n, r, generator=g, dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    eb, nsq = full_space_lora_perturbation(a, b, ga, gb, s)
    for i in range(L):
        e1, n1 = full_space_lora_perturbation(a[i : i + 1], b[i : i + 1], ga[i : i + 1], gb[i : i + 1], s[i : i + 1])
        torch.testing.assert_close(eb[i], e1[0])
        torch.testing.assert_close(nsq[i], n1[0])
    e32, n32 = full_space_lora_perturbation(a.float(), b.float(), ga.float(), gb.float(), s.float())
    torch.testing.assert_close(e32.double(), eb, rtol=1e-3, atol=1e-4)


def test_flat_lora_per_layer_scope_gives_each_layer_radius_rho():
    x, y = batches(1)[0]
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "flat-lora", rho=0.2, norm_scope="layer", damping=1e-13)
    loss_of(model, x, y).backward()
    clean = {f.name: (f.A.detach().clone(), f.B.detach().clone()) for f in opt.lora}
    opt.first_step()
    for f in opt.lora:
        a, b0 = clean[f.name]
        delta_w = f.scale * (f.B.detach() - b0) @ a
        # realised W-space step = E_W P_row(A); with full-row-rank A, ||E_W P_row(A)|| <= rho
        assert float(delta_w.norm()) <= 0.2 + 1e-9
        assert float(delta_w.norm()) > 0.05
    opt.restore()


# ------------------------------------------------------------------------------------------- SPIDER
def test_psi_edge_cases_and_spider_on_constant_tensors():
    assert torch.equal(psi(torch.zeros(3, 4)), torch.zeros(3, 4))
    assert torch.equal(psi(torch.ones(5)), torch.full((5,), 0.5))
    assert torch.equal(psi(torch.tensor([2.0])), torch.tensor([0.5]))
    c = ImportanceMask.coefficients(torch.full((4,), 0.5), torch.full((4,), 0.5))
    assert torch.equal(c, torch.zeros(4))

    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, 3, dtype=torch.float64))  # constant values: std = 0
            self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # all zero
            self.one = nn.Parameter(torch.ones(1, dtype=torch.float64))  # single element

        def forward(self, x):
            return x @ self.w * self.one + self.b

    model = Const()
    opt = flatpeft.create_optimizer(model, "spider", base_optimizer="sgd", lr=0.1)
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: (lambda l: (l.backward(), l)[1])(model(x).square().mean()))
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert not torch.equal(model.b, torch.zeros(3, dtype=torch.float64))  # all-zero tensor updates freely


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "method, kwargs, needle",
    [
        ("sam", {"rho": -0.1}, "rho: -0.1"),
        ("flatpo", {"fraction": 0.0}, "fraction: 0.0"),
        ("flatpo", {"fraction": 1.5}, "fraction: 1.5"),
        ("eflat-lora", {"beta": 1.0}, "beta: 1.0"),
        ("eflat-lora", {"beta": -0.2}, "beta: -0.2"),
        ("flatpo", {"selection": "best"}, "selection: 'best'"),
        ("sam", {"rho_schedule": "exp"}, "rho_schedule: 'exp'"),
        ("sam", {"frobnicate": 1}, "'frobnicate'"),
        ("sam", {"momentum": 0.9}, "'momentum'"),  # AdamW has no momentum
        ("sam", {"total_steps": 0}, "total_steps: 0"),
        ("flat-lora", {"total_steps": 2.5}, "total_steps: 2.5"),
        ("flat-lora-random", {"total_steps": True}, "total_steps: True"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(method, kwargs, needle):
    with pytest.raises(ValueError) as err:
        flatpeft.create_optimizer(make_lora_mlp(), method, **kwargs)
    assert needle in str(err.value)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as err:
        flatpeft.create_optimizer(make_lora_mlp(), "gsam")
    for name in flatpeft.METHODS:
        assert name in str(err.value)


def test_no_trainable_parameters():
    model = make_mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        flatpeft.create_optimizer(model, "sam")


@pytest.mark.parametrize("method", [m for m in flatpeft.method_names() if flatpeft.get_method(m).needs_lora])
def test_lora_only_methods_refuse_models_without_lora(method):
    with pytest.raises(ValueError, match="needs trainable LoRA layers"):
        flatpeft.create_optimizer(make_mlp(), method)


def test_base_optimizer_by_class_and_momentum_passthrough():
    opt = flatpeft.create_optimizer(make_lora_mlp(), "sam", base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="base_optimizer"):
        flatpeft.create_optimizer(make_lora_mlp(), "sam", base_optimizer="lion")


def test_step_without_closure_for_a_perturbing_method_is_an_error():
    opt = flatpeft.create_optimizer(make_lora_mlp(), "sam")
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# ------------------------------------------------------------------------------ RNG and schedulers
def test_pass2_replays_dropout_and_rng_stream_matches_base():
    x, y = batches(1)[0]
    masks = []

    def run(method):
        model = make_lora_mlp(dropout=0.5)
        model.train()
        hook = model.base_model.model.drop.register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()))
        opt = flatpeft.create_optimizer(model, method, lr=0.01)
        torch.manual_seed(42)
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
        hook.remove()
        return torch.rand(3)

    after_base = run("base")
    masks.clear()
    after_sam = run("sam")
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert torch.equal(after_base, after_sam)  # same stream consumed as one pass
    masks.clear()
    model = make_lora_mlp(dropout=0.5)
    model.base_model.model.drop.register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()))
    opt = flatpeft.create_optimizer(model, "sam", replay_rng=False)
    torch.manual_seed(42)
    opt.step(make_closure(model, x, y))
    assert not torch.equal(masks[0], masks[1])


def test_lr_scheduler_acts_through_shared_param_groups():
    model = make_lora_mlp()
    opt = flatpeft.create_optimizer(model, "sam", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    opt.zero_grad()
    opt.step(make_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_rho_schedule_cosine_defaults_for_flat_lora():
    opt = flatpeft.create_optimizer(make_lora_mlp(), "flat-lora", total_steps=10)
    assert opt.current_rho() == pytest.approx(0.05)
    opt._own["step"] = 5
    assert opt.current_rho() == pytest.approx(0.035)
    opt._own["step"] = 10
    assert opt.current_rho() == pytest.approx(0.02)


def test_step_context_generator_is_deterministic():
    a = StepState.of([], step=3, seed=11).generator()
    b = StepState.of([], step=3, seed=11).generator()
    c = StepState.of([], step=4, seed=11).generator()
    x = torch.rand(4, generator=a)
    assert torch.equal(x, torch.rand(4, generator=b))
    assert not torch.equal(x, torch.rand(4, generator=c))


# ------------------------------------------------------------------------- PEFT types and fp16 scaler
def tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["prefix", "prompt", "lora"])
@pytest.mark.parametrize("method", ["base", "sam", "asam", "flatpo", "spider"])
def test_prompt_learning_and_lora_models_train(kind, method):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    cfg = {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "lora": LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    }[kind]
    model = get_peft_model(tiny_causal_lm(), cfg)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    trainable0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = flatpeft.create_optimizer(model, method, lr=1e-2, fraction=0.5) if method == "flatpo" else flatpeft.create_optimizer(model, method, lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(float(opt.step(lambda: (lambda out: (out.loss.backward(), out.loss.detach())[1])(model(input_ids=ids, labels=ids)))))
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(p, trainable0[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, frozen0[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_only_method_on_prompt_tuning_model_is_refused():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_causal_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="flat-lora"):
        flatpeft.create_optimizer(model, "flat-lora")


def test_grad_scaler_recipe_keeps_weights_clean_when_the_step_is_skipped():
    """fp16 recipe: restore() before scaler.step(opt); an overflow in pass 2 skips the step, weights stay clean."""
    model = make_lora_mlp().float()
    x, y = batches(1)[0]
    x = x.float()
    opt = flatpeft.create_optimizer(model, "sam", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = snapshot(model)
    scaler.scale(loss_of(model, x, y)).backward()
    opt.first_step()
    (scaler.scale(loss_of(model, x, y)) * float("inf")).backward()  # overflow in pass 2
    opt.restore()
    scaler.step(opt)
    scaler.update()
    assert_same(snapshot(model), before)
    assert scaler.get_scale() < 2.0**10
    # a normal step then goes through
    opt.zero_grad()
    scaler.scale(loss_of(model, x, y)).backward()
    opt.first_step()
    scaler.scale(loss_of(model, x, y)).backward()
    opt.restore()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_custom_param_groups_for_weight_decay():
    model = make_lora_mlp()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "lora_A" in n], "weight_decay": 0.1},
              {"params": [p for n, p in named if "lora_B" in n], "weight_decay": 0.0}]
    opt = flatpeft.create_optimizer(model, "sam", params=groups, lr=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.names[0].endswith("lora_A.default.weight")
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    with pytest.raises(ValueError, match="not a trainable parameter"):
        flatpeft.create_optimizer(model, "sam", params=[torch.nn.Parameter(torch.zeros(2))])
