"""``nbar`` / ``obar``: balancedness-aware regularisation for LoRA (Li, Zhang & He, NeurIPS 2024). 1 pass.

EXPERIMENTAL: no official code was available; the updates follow the derivation in docs/algorithms.md, "BAR".
With balancedness ``beta = (||B||^2 - ||A||^2) / 2`` per LoRA layer and ``a_t = alpha (1 - t/T)`` (linear decay over
``total_steps``, constant without; third-party gBAR ``a_0 = 0.2``):

* ``obar`` adds to the update gradient exactly the gradient of the regulariser
  ``R = (a_t / 4) (||B||^2 - ||A||^2)^2``: ``g_B += a_t (||B||^2 - ||A||^2) B``, ``g_A -= a_t (||B||^2 - ||A||^2) A``.
* ``nbar`` mimics SAM's balancedness drift with a rescale before the base step:
  ``B <- (1 + eta_B a_t D / (2 ||B||^2)) B``, ``A <- (1 - eta_A a_t D / (2 ||A||^2)) A`` with
  ``D = (||g_B||^2 - ||g_A||^2) / sqrt(||g_B||^2 + ||g_A||^2)``; ``eta_B``, ``eta_A`` are the learning rates of the
  parameter groups holding ``B`` and ``A`` (a zero factor is not rescaled).

``rho`` is ignored.
"""
from __future__ import annotations

import torch

from flatpeft._checks import non_negative
from flatpeft._dist import local
from flatpeft._foreach import sq_norms
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import StepState
from flatpeft.perturb.rules import Rule
from flatpeft.perturb.schedules import scheduled

__all__ = ["Balancedness"]


class Balancedness(Rule):
    """BAR for LoRA pairs (see the module docstring); ``mode`` is ``"nbar"`` or ``"obar"``."""

    lora_factors = ("A", "B")  # nBAR reads the learning rate of each factor's group

    def __init__(self, mode: str, alpha: float) -> None:
        self.mode = mode
        self.alpha = alpha

    @torch.no_grad()
    def before_update(self, state: StepState) -> None:
        layers = state.lora
        if not layers:
            return
        a_t = scheduled(self.alpha, state.step, state.total_steps, "linear", 0.0)
        As = [f.A for f in layers]
        Bs = [f.B for f in layers]
        # one reduction for both factors when the factors are sharded (FSDP2)
        na, nb = sq_norms(As + Bs).split(len(As))
        state.metrics["balancedness"] = 0.5 * (nb - na).sum()
        if self.mode == "obar":
            self._obar(layers, As, Bs, list(((nb - na) * a_t).unbind()))
        else:
            self._nbar(state, layers, As, Bs, na, nb, a_t)

    @staticmethod
    def _obar(layers, As, Bs, coef) -> None:
        """``g_B += c B``, ``g_A -= c A`` with ``c = a_t (||B||^2 - ||A||^2)``: the gradient of ``R``."""
        for f, a, b, c in zip(layers, As, Bs, coef):
            for p, w, coef_p in ((f.B, b, c), (f.A, a, -c)):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local(p.grad).add_(local(w) * coef_p.to(w.dtype))

    @staticmethod
    def _nbar(state: StepState, layers, As, Bs, na, nb, a_t: float) -> None:
        ga = [local(f.A.grad) if f.A.grad is not None else torch.zeros_like(local(f.A)) for f in layers]
        gb = [local(f.B.grad) if f.B.grad is not None else torch.zeros_like(local(f.B)) for f in layers]
        gna, gnb = sq_norms(ga + gb, like=As + Bs).split(len(ga))
        denom = (gna + gnb).sqrt()
        d = torch.where(denom > 0, (gnb - gna) / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(denom))
        tiny = torch.finfo(nb.dtype).tiny
        inv_b = torch.where(nb > 0, d / nb.clamp_min(tiny), torch.zeros_like(nb))
        inv_a = torch.where(na > 0, d / na.clamp_min(tiny), torch.zeros_like(na))
        # host learning rates enter as scalar multipliers: no host-to-device copy
        for f, a, b, ib, ia in zip(layers, As, Bs, inv_b.unbind(), inv_a.unbind()):
            local(b).mul_((1.0 + ib * (state.lr_of(f.B) * a_t / 2.0)).to(b.dtype))
            local(a).mul_((1.0 - ia * (state.lr_of(f.A) * a_t / 2.0)).to(a.dtype))


def _builder(mode: str):
    def build(alpha: float = 0.2) -> list[Rule]:
        non_negative("alpha", alpha)
        return [Balancedness(mode, alpha)]

    build.__doc__ = f"{mode}: balancedness-aware regularisation (experimental)."
    return build


_COMMON = dict(needs_lora=True, reference="arXiv 2410.14802", schedule="linear alpha decay",
               sources={"alpha": "third-party gBAR a_0 = 0.2 (BAR's own values unavailable)"}, perturbs="nothing")
register_method(MethodInfo("nbar", _builder("nbar"), summary="nBAR (experimental): SAM's balancedness drift as a factor rescale",
                           memory="none", **_COMMON))
register_method(MethodInfo("obar", _builder("obar"), summary="oBAR (experimental): gradient of (alpha/4)(||B||^2 - ||A||^2)^2",
                           memory="none", **_COMMON))
