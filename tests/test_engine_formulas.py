"""One shared battery over the registry: each method's steps with SGD against an independent float64 reference.

The references below re-derive every method from docs/algorithms.md with plain tensor maths on copies (explicit
pseudo-inverses, boolean indexing, autograd of stated regularisers, ``torch.func.functional_call`` for gradients at
arbitrary points); they share no code with the engine (the noise seeding formula is restated here, not imported).
The model has two LoRA layers and a fully trained head (``modules_to_save``), so head handling is covered for every
method. One or more rows per method in ``CASES``; multi-step rows run with ``total_steps`` so schedules move.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import flatpeft

from conftest import make_closure, make_lora_mlp

LR = 0.1
LAYERS = ("lin0", "lin1")
SCALE = 4 / 2  # lora_alpha / r of make_lora_mlp


def names(layer: str) -> tuple[str, str, str]:
    pre = f"base_model.model.{layer}"
    return f"{pre}.lora_A.default.weight", f"{pre}.lora_B.default.weight", f"{pre}.base_layer.weight"


HEAD = ("base_model.model.head.modules_to_save.default.weight", "base_model.model.head.modules_to_save.default.bias")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def loss_at(model, values, x, y, frozen_values=None):
    full = {**{n: p.detach() for n, p in model.named_parameters()}, **(frozen_values or {}), **values}
    return torch.nn.functional.cross_entropy(functional_call(model, full, (x,)), y)


def grad_at(model, values, x, y, frozen_values=None, extra=None):
    """Gradient of the loss (plus ``extra(values)``) w.r.t. the trainable tensors, evaluated at ``values``."""
    vals = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    loss = loss_at(model, vals, x, y, frozen_values)
    if extra is not None:
        loss = loss + extra(vals)
    return dict(zip(vals, torch.autograd.grad(loss, list(vals.values()))))


def sgd(values, grads, lrs=None):
    return {n: v - (lrs or {}).get(n, LR) * grads[n] for n, v in values.items()}


def gnorm(d):
    return math.sqrt(sum(float(t.square().sum()) for t in d.values()))


def cosine(rho, rho_min, t, total):
    return rho_min + (rho - rho_min) * 0.5 * (1 + math.cos(math.pi * t / total))


# ----------------------------------------------------------------------------------------- references
def ref_base(model, x, y, kw):
    th = trainable(model)
    return sgd(th, grad_at(model, th, x, y))


def ref_sam(model, x, y, kw):
    th = trainable(model)
    g = grad_at(model, th, x, y)
    n = gnorm(g)
    pert = {k: th[k] + kw["rho"] * g[k] / (n + 1e-12) for k in th}
    return sgd(th, grad_at(model, pert, x, y))


def ref_asam(model, x, y, kw):
    th = trainable(model)
    g = grad_at(model, th, x, y)
    t = {k: th[k].abs() + kw["eta"] for k in th}
    n = math.sqrt(sum(float((t[k] * g[k]).square().sum()) for k in th))
    pert = {k: th[k] + kw["rho"] * t[k] ** 2 * g[k] / n for k in th}
    return sgd(th, grad_at(model, pert, x, y))


def ref_flatpo(model, x, y, kw):
    """Eligible = adapter tensors (scope 'adapters') or all; N over the eligible; top-k of them by ||g||."""
    th = trainable(model)
    g = grad_at(model, th, x, y)
    no_adapters = not any(map(is_adapter, th))  # full fine-tuning: every tensor is eligible
    eligible = [q for q in th if kw.get("scope", "adapters") == "all" or no_adapters or is_adapter(q)]
    n_all = gnorm({q: g[q] for q in eligible})
    k = max(1, math.floor(kw["fraction"] * len(eligible)))
    chosen = sorted(eligible, key=lambda q: float(g[q].norm()), reverse=True)[:k]
    pert = {q: th[q] + (kw["rho"] * g[q] / n_all if q in chosen else 0.0) for q in th}
    return sgd(th, grad_at(model, pert, x, y))


def ref_sam_every(model, x, y, kw):
    """Three steps, ascent every 2: step 0 SAM (e stored), step 1 one pass at w + e_0, step 2 SAM again."""
    th = trainable(model)
    e = None
    for t in range(3):
        if t % kw["ascent_every"] == 0:
            g = grad_at(model, th, x, y)
            n = gnorm(g)
            e = {k: kw["rho"] * g[k] / (n + 1e-12) for k in th}
        th = sgd(th, grad_at(model, {k: th[k] + e[k] for k in th}, x, y))
    return th


def ref_flatpo_lagged(model, x, y, kw):
    """Three steps: gradient at w + lag; FlatPO's sparse e from it (selection refreshed every T steps); SGD; EMA."""
    th = trainable(model)
    eligible = [q for q in th if is_adapter(q)]
    lag = {q: torch.zeros_like(th[q]) for q in eligible}
    ema = dict(lag)
    chosen = []
    for t in range(3):
        g = grad_at(model, {k: th[k] + lag.get(k, 0.0) for k in th}, x, y)
        n = gnorm({q: g[q] for q in eligible})
        if t % kw.get("refresh_every", 1) == 0:
            k = max(1, math.floor(kw["fraction"] * len(eligible)))
            chosen = sorted(eligible, key=lambda q: float(g[q].norm()), reverse=True)[:k]
        e = {q: (kw["rho"] * g[q] / (n + 1e-12) if q in chosen else torch.zeros_like(g[q])) for q in eligible}
        th = sgd(th, g)
        ema = {q: kw["beta"] * ema[q] + (1 - kw["beta"]) * e[q] for q in eligible}
        lag = dict(ema)
    return th


def flat_lora_eb(th, g, rho, per_layer=False):
    """Flat-LoRA E_B per layer with explicit pseudo-inverses; one global norm or one norm per layer."""
    ghat = {}
    for layer in LAYERS:
        a, b, _ = names(layer)
        g1 = g[b] @ torch.linalg.pinv(th[a].T) / SCALE
        g2 = torch.linalg.pinv(th[b].T) @ g[a] / SCALE
        ghat[layer] = 0.5 * (g1 + g2)
    n = math.sqrt(sum(float(v.square().sum()) for v in ghat.values()))
    out = {}
    for layer in LAYERS:
        norm = float(ghat[layer].norm()) if per_layer else n
        out[names(layer)[1]] = (rho * ghat[layer] / norm) @ torch.linalg.pinv(th[names(layer)[0]]) / SCALE
    return out


def ref_flat_lora(model, x, y, kw):
    """Steps with the cosine decay of rho to 0.4 rho over total_steps."""
    th = trainable(model)
    for t in range(kw["total_steps"] and 2 or 1):
        rho_t = cosine(kw["rho"], 0.4 * kw["rho"], t, kw["total_steps"]) if kw.get("total_steps") else kw["rho"]
        g = grad_at(model, th, x, y)
        eb = flat_lora_eb(th, g, rho_t, per_layer=kw.get("norm_scope") == "layer")
        pert = {k: th[k] + eb.get(k, 0.0) for k in th}
        th = sgd(th, grad_at(model, pert, x, y))
    return th


def ref_eflat_lora(model, x, y, kw):
    """Three steps: the gradient at B + c lag, E_new from the clean weights, SGD, EMA (beta = weight of the past);
    ``c = min(1, rho_t / R)`` caps the lag's full-space radius ``R = sqrt(sum ||s lag A||^2)`` at the current A."""
    th = trainable(model)
    lag = {names(layer)[1]: torch.zeros_like(th[names(layer)[1]]) for layer in LAYERS}
    ema = dict(lag)
    for t in range(3):
        rho_t = cosine(kw["rho"], 0.4 * kw["rho"], t, kw["total_steps"])
        radius = math.sqrt(sum(float((SCALE * lag[names(layer)[1]] @ th[names(layer)[0]]).square().sum()) for layer in LAYERS))
        c = min(1.0, rho_t / radius) if radius > 0 else 1.0
        pert = {k: th[k] + c * lag.get(k, 0.0) for k in th}
        g = grad_at(model, pert, x, y)
        e_new = flat_lora_eb(th, g, rho_t)
        th = sgd(th, g)
        ema = {k: kw["beta"] * ema[k] + (1 - kw["beta"]) * e_new[k] for k in ema}
        lag = dict(ema)
    return th


def noise_seed(seed, step, rank, layer):
    """The documented seeding of flat-lora-random (docs/algorithms.md), restated."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + layer * 15_485_863 + 12_345) % (2**63 - 1)


def ref_flat_lora_random(model, x, y, kw):
    """Three steps; noise ramp f_t = (1 - cos(pi t / T)) / 2 (0 at step 0), per-layer generators."""
    th = trainable(model)
    w0 = frozen(model)
    for t in range(3):
        ramp = 0.5 * (1 - math.cos(math.pi * t / kw["total_steps"]))
        noisy = dict(w0)
        for i, layer in enumerate(LAYERS):
            a, b, w = names(layer)
            merged = w0[w] + SCALE * th[b] @ th[a]
            sigma = ramp * kw["rho"] * merged.norm(dim=1) / math.sqrt(merged.shape[1])
            gen = torch.Generator().manual_seed(noise_seed(kw["seed"], t, 0, i))
            noise = torch.randn(merged.shape, generator=gen, dtype=torch.float32).double() * sigma[:, None]
            noisy[w] = w0[w] + noise
        th = sgd(th, grad_at(model, th, x, y, frozen_values=noisy))
    return th


def ref_psi(t):
    a = t.abs()
    if float(a.max()) == 0:
        return torch.zeros_like(a)
    std = a.std() if a.numel() > 1 else torch.tensor(float("nan"))
    if not math.isfinite(float(std)) or float(std) == 0:
        return torch.full_like(a, 0.5)
    return torch.sigmoid((a - a.mean()) / std)


def ref_spider(model, x, y, kw):
    """Two steps of SGD + SPIDER's allocation toward theta0, on the masked tensors only (the head by default)."""
    th0 = trainable(model)
    masked = [k for k in th0 if kw.get("mask_scope", "pretrained") == "all" or not is_adapter(k)]  # no adapters: all
    i_pre = {k: ref_psi(th0[k]) for k in masked}
    acc = {k: torch.zeros_like(th0[k]) for k in masked}
    th = dict(th0)
    for _ in range(2):
        g = grad_at(model, th, x, y)
        stepped = sgd(th, g)
        new = dict(stepped)
        for k in masked:
            acc[k] = acc[k] + g[k]
            i_ft = ref_psi(acc[k])
            c = torch.where(i_ft > i_pre[k], i_ft / (i_pre[k] + i_ft), torch.zeros_like(i_ft))
            nz = c[c != 0]
            if nz.numel():
                c = torch.clamp(c / nz.mean(), max=1.0)
            new[k] = th0[k] + c * (stepped[k] - th0[k])
        th = new
    return th


LR_A = 0.03  # nbar/obar rows: A factors in their own parameter group


def factor_groups(model):
    ps = dict(model.named_parameters())
    a = [p for n, p in ps.items() if ".lora_A." in n]
    rest = [p for n, p in ps.items() if p.requires_grad and ".lora_A." not in n]
    return [{"params": a, "lr": LR_A}, {"params": rest}]


def ref_nbar(model, x, y, kw):
    """B rescaled with B's learning rate, A with A's (A sits in a group with lr LR_A)."""
    th = trainable(model)
    g = grad_at(model, th, x, y)
    out = dict(th)
    lrs = {k: LR_A for k in th if ".lora_A." in k}
    for layer in LAYERS:
        a, b, _ = names(layer)
        gb2, ga2 = float(g[b].square().sum()), float(g[a].square().sum())
        d = (gb2 - ga2) / math.sqrt(gb2 + ga2)
        out[b] = (1 + LR * kw["alpha"] * d / (2 * float(th[b].square().sum()))) * th[b]
        out[a] = (1 - LR_A * kw["alpha"] * d / (2 * float(th[a].square().sum()))) * th[a]
    return sgd(out, g, lrs)


def ref_obar(model, x, y, kw):
    """Two steps; the update gradient is autograd of loss + (a_t / 4) sum_l (||B||^2 - ||A||^2)^2, a_t linear decay."""
    th = trainable(model)
    lrs = {k: LR_A for k in th if ".lora_A." in k}
    for t in range(2):
        a_t = kw["alpha"] * (1 - t / kw["total_steps"])

        def reg(v, a_t=a_t):
            return sum(a_t / 4 * (v[names(l)[1]].square().sum() - v[names(l)[0]].square().sum()) ** 2 for l in LAYERS)

        th = sgd(th, grad_at(model, th, x, y, extra=reg), lrs)
    return th


# id -> (method, method kwargs, reference, number of steps, parameter groups or None)
CASES = {
    "base": ("base", {}, ref_base, 1, None),
    "sam": ("sam", {"rho": 0.07}, ref_sam, 1, None),
    "asam": ("asam", {"rho": 0.5, "eta": 0.01}, ref_asam, 1, None),
    "flat-lora": ("flat-lora", {"rho": 0.07, "damping": 1e-13, "total_steps": 3}, ref_flat_lora, 2, None),
    "flat-lora[layer]": ("flat-lora", {"rho": 0.07, "damping": 1e-13, "norm_scope": "layer", "total_steps": 3}, ref_flat_lora, 2, None),
    "eflat-lora": ("eflat-lora", {"rho": 0.07, "beta": 0.3, "damping": 1e-13, "total_steps": 4}, ref_eflat_lora, 3, None),
    "flat-lora-random": ("flat-lora-random", {"rho": 0.2, "seed": 7, "total_steps": 4}, ref_flat_lora_random, 3, None),
    "flatpo": ("flatpo", {"rho": 0.07, "fraction": 0.5}, ref_flatpo, 1, None),
    "flatpo[all]": ("flatpo", {"rho": 0.07, "fraction": 0.34, "scope": "all"}, ref_flatpo, 1, None),
    "sam[ascent_every=2]": ("sam", {"rho": 0.07, "ascent_every": 2}, ref_sam_every, 3, None),
    "flatpo-lagged": ("flatpo-lagged", {"rho": 0.07, "fraction": 0.5, "beta": 0.4}, ref_flatpo_lagged, 3, None),
    "flatpo-lagged[refresh=2]": ("flatpo-lagged", {"rho": 0.07, "fraction": 0.25, "beta": 0.4, "refresh_every": 2},
                                 ref_flatpo_lagged, 3, None),
    "spider": ("spider", {}, ref_spider, 2, None),
    "spider[all]": ("spider", {"mask_scope": "all"}, ref_spider, 2, None),
    "nbar": ("nbar", {"alpha": 0.5}, ref_nbar, 1, factor_groups),
    "obar": ("obar", {"alpha": 0.5, "total_steps": 4}, ref_obar, 2, factor_groups),
}


def test_every_built_in_method_has_a_row():
    assert {c[0] for c in CASES.values()} == set(flatpeft.METHODS)


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_reference(case, data):
    x, y = data
    method, kw, ref, steps, groups = CASES[case]
    model = make_lora_mlp()
    expected = ref(model, x, y, kw)
    params = groups(model) if groups else None
    opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=LR, params=params, **kw)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
    got = trainable(model)
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-11, msg=f"{case}: {k}")
    # and the method really did something different from the base steps (the test can fail)
    if method != "base":
        plain_model = make_lora_mlp()
        plain = trainable(plain_model)
        for _ in range(steps):
            plain = sgd(plain, grad_at(plain_model, plain, x, y), {k: LR_A for k in plain if ".lora_A." in k} if groups else None)
        assert any(not torch.allclose(got[k], plain[k], rtol=0, atol=1e-10) for k in got), case


def test_sam_on_plain_mlp_matches_reference(data):
    """SAM / ASAM / FlatPO also work on a model without peft (full fine-tuning)."""
    from conftest import make_mlp

    x, y = data
    for method in ("sam", "asam", "flatpo", "spider"):
        model = make_mlp()
        _, kw, ref, steps, _ = CASES[method]
        expected = ref(model, x, y, kw)
        opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=LR, **kw)
        for _ in range(steps):
            opt.zero_grad()
            opt.step(make_closure(model, x, y))
        for k, v in trainable(model).items():
            torch.testing.assert_close(v, expected[k], rtol=1e-9, atol=1e-11, msg=f"{method}: {k}")
