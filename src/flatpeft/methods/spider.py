"""``spider``: SPIDER importance-aware weight allocation (Huang et al., arXiv 2411.10928, ICML 2025). 1 pass.

After each base step, ``theta = theta0 + c * (theta~ - theta0)`` where ``c`` selects the entries whose fine-tuning
importance (standardised accumulated gradient magnitude) beats their pre-trained importance (standardised
pre-trained weight magnitude); docs/algorithms.md, "SPIDER". No hyper-parameters besides the scope (``rho`` is
ignored). Not a flatness method: an anti-forgetting update mask, provided as a baseline.

Scope (``mask_scope``). SPIDER's pre-trained importance is the magnitude of *pre-trained* weights. PEFT adapter
tensors have none: LoRA ``A`` is a random initialisation and ``B``, prompt and prefix tensors start at zero or at
copies; anchoring them to their start would pin about half of ``A`` to noise. So by default
(``mask_scope="pretrained"``) the mask applies to trainable tensors that are not PEFT adapter tensors (full
fine-tuning weights, norms, biases, ``modules_to_save`` copies such as a classifier head: flatpeft cannot tell a
freshly initialised head from a pre-trained one and treats it as pre-trained), and adapter tensors are updated
normally. On a pure LoRA model SPIDER then equals the base optimizer. ``mask_scope="all"`` masks every trainable
tensor, anchored at its value at the first step (the reference code's behaviour).
"""
from __future__ import annotations

import torch

from flatpeft._checks import one_of
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import StepState
from flatpeft.perturb.rules import Rule

__all__ = ["ImportanceMask", "psi", "build"]


def psi(x: torch.Tensor) -> torch.Tensor:
    """SPIDER's standardised magnitude score ``sigmoid((|X| - mean|X|) / std|X|)`` (unbiased std, per tensor).

    Edge cases: an all-zero tensor scores 0 everywhere (the reference behaviour); any other tensor whose std is 0
    or undefined (constant values, a single element) scores 0.5 (z = 0), where the formula would give NaN.
    """
    a = x.abs().to(torch.promote_types(x.dtype, torch.float32))
    if a.numel() > 1:
        std = a.std()
    else:
        std = torch.zeros((), dtype=a.dtype, device=a.device)
    ok = torch.isfinite(std) & (std > 0)
    z = torch.where(ok, (a - a.mean()) / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(a))
    score = torch.sigmoid(z)
    return torch.where(a.amax() > 0, score, torch.zeros_like(score))


class ImportanceMask(Rule):
    """SPIDER: update only where fine-tuning importance beats pre-trained importance.

    At the first step ``theta0`` (float32 copy of every masked tensor) and ``I_pre = psi(theta0)`` are stored.
    Every step: ``G <- G + g`` (running sum of the update gradients, read before the base step; non-finite
    entries count as 0), ``I_ft = psi(G)``, ``c = I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre`` else 0,
    ``c <- min(1, c / mean(c[c != 0]))``, and after the base step ``theta <- theta0 + c * (theta~ - theta0)``.
    """

    def __init__(self, mask_scope: str = "pretrained") -> None:
        self.mask_scope = mask_scope

    def _masked(self, state: StepState) -> list[torch.Tensor]:
        if self.mask_scope == "all" or not any(state.adapters):
            return list(state.trainable)
        return [p for p, is_adapter in zip(state.trainable, state.adapters) if not is_adapter]

    def before_update(self, state: StepState) -> None:
        params = self._masked(state)
        if not params:
            return
        fp32 = lambda p: torch.promote_types(p.dtype, torch.float32)  # noqa: E731
        # anchors of the first step (created once, read in after_update)
        state.buffers("theta0", params, lambda p: p.detach().to(fp32(p)).clone())
        state.buffers("importance_pre", params, lambda p: psi(p.detach()))
        acc = state.buffers("grad_sum", params, lambda p: torch.zeros_like(p, dtype=fp32(p)))
        grads = [p.grad.to(a.dtype) if p.grad is not None else torch.zeros_like(a) for p, a in zip(params, acc)]
        grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
        torch._foreach_add_(acc, grads)

    @torch.no_grad()
    def after_update(self, state: StepState) -> None:
        params = self._masked(state)
        theta0 = state.buffers("theta0", params)
        i_pre = state.buffers("importance_pre", params)
        acc = state.buffers("grad_sum", params)
        kept = []
        for p, t0, ip, g in zip(params, theta0, i_pre, acc):
            c = self.coefficients(ip, psi(g))
            kept.append(c.mean())
            p.copy_(torch.lerp(t0, p.to(t0.dtype), c).to(p.dtype))
        if kept:
            state.metrics["update_fraction"] = torch.stack([k.to(kept[0].device) for k in kept]).mean()

    @staticmethod
    def coefficients(i_pre: torch.Tensor, i_ft: torch.Tensor) -> torch.Tensor:
        """``c = min(1, c0 / mean(c0[c0 != 0]))`` with ``c0 = I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre``."""
        sel = i_ft > i_pre
        c = torch.where(sel, i_ft / (i_pre + i_ft).clamp_min(torch.finfo(i_ft.dtype).tiny), torch.zeros_like(i_ft))
        mean_nz = c.sum() / sel.sum().clamp_min(1)
        return torch.where(sel, (c / mean_nz.clamp_min(torch.finfo(c.dtype).tiny)).clamp_max(1.0), torch.zeros_like(c))


def build(mask_scope: str = "pretrained") -> list[Rule]:
    one_of("mask_scope", mask_scope, ("pretrained", "all"))
    return [ImportanceMask(mask_scope)]


register_method(
    MethodInfo("spider", build, summary="SPIDER: update only entries whose fine-tuning importance beats pre-trained importance",
               reference="arXiv 2411.10928",
               sources={"mask_scope": "flatpeft decision: adapter tensors have no pre-trained values; 'all' = reference code"},
               perturbs="nothing (masks the update of tensors with pre-trained values)",
               memory="persistent: 3 fp32 copies (theta0, I_pre, gradient sum) of every masked tensor")
)
