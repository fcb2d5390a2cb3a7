"""One shared battery over the registry: each method's step with SGD against an independent float64 reference.

The references below re-derive every method from shared/spec/algorithms.md with plain tensor maths on copies
(explicit pseudo-inverses, boolean indexing, ``torch.func.functional_call`` for gradients at arbitrary points);
they share no code with the engine. One row per method in ``CASES``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

import flatpeft
from flatpeft.perturb.base import StepContext

from conftest import make_closure, make_lora_mlp

LR = 0.1
LAYERS = ("lin0", "lin1")
SCALE = 4 / 2  # lora_alpha / r of make_lora_mlp


def names(layer: str) -> tuple[str, str, str]:
    pre = f"base_model.model.{layer}"
    return f"{pre}.lora_A.default.weight", f"{pre}.lora_B.default.weight", f"{pre}.base_layer.weight"


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def grad_at(model, values, x, y, frozen_values=None):
    """Gradient of the loss w.r.t. the trainable tensors, evaluated at ``values`` (and ``frozen_values``)."""
    vals = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    full = {**{n: p.detach() for n, p in model.named_parameters()}, **(frozen_values or {}), **vals}
    loss = torch.nn.functional.cross_entropy(functional_call(model, full, (x,)), y)
    return dict(zip(vals, torch.autograd.grad(loss, list(vals.values()))))


def sgd(values, grads):
    return {n: v - LR * grads[n] for n, v in values.items()}


def gnorm(d):
    return math.sqrt(sum(float(t.square().sum()) for t in d.values()))


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
    th = trainable(model)
    g = grad_at(model, th, x, y)
    n_all = gnorm(g)
    keys = list(th)
    k = max(1, math.floor(kw["fraction"] * len(keys)))
    chosen = sorted(keys, key=lambda q: float(g[q].norm()), reverse=True)[:k]
    pert = {q: th[q] + (kw["rho"] * g[q] / n_all if q in chosen else 0.0) for q in keys}
    return sgd(th, grad_at(model, pert, x, y))


def flat_lora_eb(th, g, rho):
    """Flat-LoRA E_B per layer with explicit pseudo-inverses and one global norm (spec section 4)."""
    ghat = {}
    for layer in LAYERS:
        a, b, _ = names(layer)
        g1 = g[b] @ torch.linalg.pinv(th[a].T) / SCALE
        g2 = torch.linalg.pinv(th[b].T) @ g[a] / SCALE
        ghat[layer] = 0.5 * (g1 + g2)
    n = math.sqrt(sum(float(v.square().sum()) for v in ghat.values()))
    return {names(layer)[1]: (rho * ghat[layer] / n) @ torch.linalg.pinv(th[names(layer)[0]]) / SCALE for layer in LAYERS}


def ref_flat_lora(model, x, y, kw):
    th = trainable(model)
    g = grad_at(model, th, x, y)
    eb = flat_lora_eb(th, g, kw["rho"])
    pert = {k: th[k] + eb.get(k, 0.0) for k in th}
    return sgd(th, grad_at(model, pert, x, y))


def ref_eflat_lora(model, x, y, kw):
    """Two steps: step 1 at E_bar = 0; step 2 at B + (1 - beta) E_new(step 1)."""
    th = trainable(model)
    g1 = grad_at(model, th, x, y)
    e_new = flat_lora_eb(th, g1, kw["rho"])
    th1 = sgd(th, g1)
    ema = {k: (1 - kw["beta"]) * v for k, v in e_new.items()}
    pert = {k: th1[k] + ema.get(k, 0.0) for k in th1}
    return sgd(th1, grad_at(model, pert, x, y))


def ref_flat_lora_random(model, x, y, kw):
    th = trainable(model)
    w0 = frozen(model)
    noisy = dict(w0)
    gen = StepContext([], [], 0.0, 0, kw["seed"]).generator("cpu")  # documented seeding: (seed, step)
    for layer in LAYERS:
        a, b, w = names(layer)
        merged = w0[w] + SCALE * th[b] @ th[a]
        sigma = kw["rho"] * merged.norm(dim=1) / math.sqrt(merged.shape[1])
        noise = torch.randn(merged.shape, generator=gen, dtype=torch.float32).double() * sigma[:, None]
        noisy[w] = w0[w] + noise
    return sgd(th, grad_at(model, th, x, y, frozen_values=noisy))


def ref_psi(t):
    a = t.abs()
    if float(a.max()) == 0:
        return torch.zeros_like(a)
    std = a.std() if a.numel() > 1 else torch.tensor(float("nan"))
    if not math.isfinite(float(std)) or float(std) == 0:
        return torch.full_like(a, 0.5)
    return torch.sigmoid((a - a.mean()) / std)


def ref_spider(model, x, y, kw):
    """Two steps of SGD + SPIDER's allocation toward theta0."""
    th0 = trainable(model)
    i_pre = {k: ref_psi(v) for k, v in th0.items()}
    acc = {k: torch.zeros_like(v) for k, v in th0.items()}
    th = dict(th0)
    for _ in range(2):
        g = grad_at(model, th, x, y)
        stepped = sgd(th, g)
        new = {}
        for k in th:
            acc[k] = acc[k] + g[k]
            i_ft = ref_psi(acc[k])
            c = torch.where(i_ft > i_pre[k], i_ft / (i_pre[k] + i_ft), torch.zeros_like(i_ft))
            nz = c[c != 0]
            if nz.numel():
                c = torch.clamp(c / nz.mean(), max=1.0)
            new[k] = th0[k] + c * (stepped[k] - th0[k])
        th = new
    return th


def ref_nbar(model, x, y, kw):
    th = trainable(model)
    g = grad_at(model, th, x, y)
    out = dict(th)
    for layer in LAYERS:
        a, b, _ = names(layer)
        gb2, ga2 = float(g[b].square().sum()), float(g[a].square().sum())
        d = (gb2 - ga2) / math.sqrt(gb2 + ga2)
        out[b] = (1 + LR * kw["alpha"] * d / (2 * float(th[b].square().sum()))) * th[b]
        out[a] = (1 - LR * kw["alpha"] * d / (2 * float(th[a].square().sum()))) * th[a]
    return sgd(out, g)


def ref_obar(model, x, y, kw):
    th = trainable(model)
    g = dict(grad_at(model, th, x, y))
    for layer in LAYERS:
        a, b, _ = names(layer)
        beta = 0.5 * (float(th[b].square().sum()) - float(th[a].square().sum()))
        g[b] = g[b] + kw["alpha"] * beta * th[b]
        g[a] = g[a] - kw["alpha"] * beta * th[a]
    return sgd(th, g)


# name -> (method kwargs, reference, number of steps)
CASES = {
    "base": ({}, ref_base, 1),
    "sam": ({"rho": 0.07}, ref_sam, 1),
    "asam": ({"rho": 0.5, "eta": 0.01}, ref_asam, 1),
    "flat-lora": ({"rho": 0.07, "damping": 1e-13}, ref_flat_lora, 1),
    "eflat-lora": ({"rho": 0.07, "beta": 0.3, "damping": 1e-13}, ref_eflat_lora, 2),
    "flat-lora-random": ({"rho": 0.2, "seed": 7}, ref_flat_lora_random, 1),
    "flatpo": ({"rho": 0.07, "fraction": 0.5}, ref_flatpo, 1),
    "spider": ({}, ref_spider, 2),
    "nbar": ({"alpha": 0.5}, ref_nbar, 1),
    "obar": ({"alpha": 0.5}, ref_obar, 1),
}


def test_every_registered_method_has_a_row():
    assert set(CASES) == set(flatpeft.METHODS)


@pytest.mark.parametrize("method", list(CASES))
def test_step_matches_reference(method, data):
    x, y = data
    kw, ref, steps = CASES[method]
    model = make_lora_mlp()
    expected = ref(model, x, y, kw)
    opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=LR, **kw)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
    got = trainable(model)
    assert set(got) == set(expected)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-11, msg=f"{method}: {k}")
    # and the method really did something different from the base step (the test can fail)
    if method != "base":
        plain = ref_base(make_lora_mlp(), x, y, {})
        assert any(not torch.allclose(got[k], plain[k], rtol=0, atol=1e-10) for k in got), method


def test_sam_on_plain_mlp_matches_reference(data):
    """SAM / ASAM / FlatPO also work on a model without peft (full fine-tuning)."""
    from conftest import make_mlp

    x, y = data
    for method in ("sam", "asam", "flatpo", "spider"):
        model = make_mlp()
        kw, ref, steps = CASES[method]
        expected = ref(model, x, y, kw)
        opt = flatpeft.create_optimizer(model, method, base_optimizer="sgd", lr=LR, **kw)
        for _ in range(steps):
            opt.zero_grad()
            opt.step(make_closure(model, x, y))
        for k, v in trainable(model).items():
            torch.testing.assert_close(v, expected[k], rtol=1e-9, atol=1e-11, msg=f"{method}: {k}")
