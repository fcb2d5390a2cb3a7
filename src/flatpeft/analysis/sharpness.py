"""Worst-case (rho-ball) sharpness of the trainable parameters, plain and adaptive (ASAM ball).

    S_rho(theta) = max_{||T^{-1} eps||_2 <= rho} L(theta + eps) - L(theta)

with ``T = I`` (SAM ball, Foret et al. 2021) or ``T = diag(|theta| + eta)`` (adaptive / ASAM ball, Kwon et al.
2021; ``eta = 0.01`` is the official ASAM default, needed for PEFT because LoRA ``B`` may be exactly 0).
Writing ``eps = T delta`` turns the constraint into ``||delta|| <= rho``.  The maximum is estimated by
projected gradient ascent in ``delta`` (as in Andriushchenko et al. 2023, "A modern look at the relationship
between sharpness and generalization", which uses APGD; here plain normalised steps):

1. start at the first-order maximiser ``delta_0 = rho T g / ||T g||`` (the SAM / ASAM perturbation
   ``eps_0 = rho T^2 g / ||T g||``); if ``g = 0`` a seeded random direction of norm ``rho`` is used;
2. ``delta_{t+1} = P(delta_t + step_size * rho * d_t / ||d_t||)`` with ``d_t = T grad L(theta + T delta_t)``
   and ``P`` the projection onto the ball ``||delta|| <= rho``.

The reported ``sharpness`` is the largest value seen over all iterates, so it is a lower bound of ``S_rho``
and never below ``sam_sharpness`` (the value at the start).  On a quadratic ``L = 0.5 w^T H w`` at ``w = 0``
the iteration is a power iteration and converges to the exact maximum ``0.5 rho^2 lambda_max``.
Parameters are restored bit-exactly after every evaluation, also on exceptions.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .operators import HessianOperator
from .results import WorstCaseSharpness

__all__ = ["worst_case_sharpness"]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(np.sqrt(sum(float(torch.sum(t.double() * t.double())) for t in tensors)))


def worst_case_sharpness(
    operator: HessianOperator,
    rho: float = 0.05,
    *,
    steps: int = 5,
    step_size: float = 1.0,
    adaptive: bool = False,
    eta: float = 0.01,
    seed: int = 0,
    progress: bool = False,
) -> WorstCaseSharpness:
    """Estimate ``max_{||eps/T|| <= rho} L(theta + eps) - L(theta)`` (module docstring).

    Args:
        operator: ``HessianOperator`` (provides loss and gradients at shifted points).
        rho: ball radius (> 0).
        steps: projected-ascent steps after the SAM start point (>= 0; each costs one gradient evaluation).
        step_size: ascent step length in units of ``rho`` (> 0).
        adaptive: use the ASAM ball ``T = |theta| + eta``.
        eta: ASAM offset (>= 0), only with ``adaptive``.
        seed: seeds the random start used when the gradient is exactly 0.
    """
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    params = operator.params
    if adaptive:
        scale = [p.detach().abs() + eta for p in params]
    else:
        scale = [torch.ones_like(p) for p in params]
    loss0, grads = operator.gradient()
    d = [t * g for t, g in zip(scale, grads)]
    dn = _norm(d)
    if dn == 0.0:
        gen = torch.Generator().manual_seed(seed)
        d = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]
        dn = _norm(d)
    delta = [x * (rho / dn) for x in d]
    history: list[float] = []
    best = -np.inf
    best_norm = 0.0
    for t in tqdm(range(steps + 1), desc="worst-case sharpness", disable=not progress, leave=False):
        eps = [s * x for s, x in zip(scale, delta)]
        if t < steps:
            loss_t, g_t = operator.gradient_at(eps)
        else:
            loss_t = operator.loss_at(eps)
        value = loss_t - loss0
        history.append(value)
        if value > best:
            best, best_norm = value, _norm(eps)
        if t == steps:
            break
        d = [s * g for s, g in zip(scale, g_t)]
        dn = _norm(d)
        if dn == 0.0:  # stationary point inside the ball: nothing more to climb
            break
        delta = [x + (step_size * rho / dn) * y for x, y in zip(delta, d)]
        n = _norm(delta)
        if n > rho:
            delta = [x * (rho / n) for x in delta]
    return WorstCaseSharpness(
        rho=float(rho),
        adaptive=bool(adaptive),
        eta=float(eta if adaptive else 0.0),
        steps=steps,
        step_size=float(step_size),
        loss=float(loss0),
        sharpness=float(best),
        sam_sharpness=float(history[0]),
        history=tuple(float(h) for h in history),
        perturbation_norm=float(best_norm),
    )
