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

import warnings

import torch

from flatpeft._checks import one_of
from flatpeft._dist import local, locals_, reduce_rows_
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import StepState
from flatpeft.perturb.rules import Rule

__all__ = ["ImportanceMask", "psi", "psi_all", "build"]


def psi(x: torch.Tensor) -> torch.Tensor:
    """SPIDER's standardised magnitude score ``sigmoid((|X| - mean|X|) / std|X|)`` (unbiased std, per tensor).

    Edge cases: an all-zero tensor scores 0 everywhere (the reference behaviour); any other tensor whose std is 0
    or undefined (constant values, a single element) scores 0.5 (z = 0), where the formula would give NaN.
    """
    return psi_all([x], [x])[0]


def _vector(scalars: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor 0-d statistics as one vector on the first one's device (for a metric)."""
    device = scalars[0].device
    return torch.stack([x.to(device) for x in scalars])


def _per_device(fn, *lists: list[torch.Tensor]) -> list[torch.Tensor]:
    """``fn(*lists)`` run once per device of ``lists[0]``'s tensors (a model split over devices), the results put
    back in order: statistics are stacked into vectors, and a vector lives on one device."""
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(lists[0]):
        groups.setdefault(t.device, []).append(i)
    if len(groups) <= 1:
        return fn(*lists)
    out: list[torch.Tensor | None] = [None] * len(lists[0])
    for idx in groups.values():
        for i, r in zip(idx, fn(*[[seq[i] for i in idx] for seq in lists])):
            out[i] = r
    return out  # type: ignore[return-value]


def psi_all(xs: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`psi` of every tensor. ``xs[i]`` may be the local shard of the sharded ``like[i]`` (FSDP2): the mean,
    the (two-pass, unbiased) std and the max are those of the whole tensor, from three reductions of per-tensor
    vectors (no collective at all when nothing is sharded: one code path for plain and sharded tensors), per
    device."""
    return _per_device(_psi_all, xs, like) if xs else []


def _psi_all(xs: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    a = [x.abs().to(torch.promote_types(x.dtype, torch.float32)) for x in xs]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32
    n = [t.numel() for t in like]  # the whole tensor's size (host integers)
    sums = reduce_rows_(torch.stack([t.sum().to(dtype) for t in a]), like)
    amax = reduce_rows_(torch.stack([(t.amax() if t.numel() else t.new_zeros(())).to(dtype) for t in a]), like, op="max")
    means = [s / k for s, k in zip(sums.unbind(), n)]
    css = reduce_rows_(torch.stack([(t - m.to(t.dtype)).square().sum().to(dtype) for t, m in zip(a, means)]), like)
    out = []
    for t, m, c, k, mx in zip(a, means, css.unbind(), n, amax.unbind()):
        std = (c / (k - 1)).sqrt() if k > 1 else torch.zeros((), dtype=dtype, device=t.device)
        ok = torch.isfinite(std) & (std > 0)
        z = torch.where(ok, (t - m.to(t.dtype)) / torch.where(ok, std, torch.ones_like(std)).to(t.dtype), torch.zeros_like(t))
        score = torch.sigmoid(z)
        out.append(torch.where(mx > 0, score, torch.zeros_like(score)))
    return out


class ImportanceMask(Rule):
    """SPIDER: update only where fine-tuning importance beats pre-trained importance.

    At the first step ``theta0`` (float32 copy of every masked tensor) and ``I_pre = psi(theta0)`` are stored.
    Every step: ``G <- G + g`` (running sum of the update gradients, read before the base step; non-finite
    entries count as 0), ``I_ft = psi(G)``, ``c = I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre`` else 0,
    ``c <- min(1, c / mean(c[c != 0]))``, and after the base step ``theta <- theta0 + c * (theta~ - theta0)``.
    """

    def __init__(self, mask_scope: str = "pretrained") -> None:
        self.mask_scope = mask_scope
        self._warned = False

    def _warn_nothing_masked(self) -> None:
        """A pure-adapter model under the default scope: SPIDER would silently be the base optimizer; say so once."""
        if not self._warned:
            self._warned = True
            warnings.warn("spider: every trainable tensor is a PEFT adapter and mask_scope='pretrained' masks only "
                          "tensors with pre-trained values, so SPIDER masks nothing here and equals the base "
                          "optimizer; pass mask_scope='all' for the reference code's scope (adapters anchored at "
                          "their first-step values)", UserWarning, stacklevel=3)

    def _masked(self, state: StepState) -> list[torch.Tensor]:
        if self.mask_scope == "all" or not any(state.adapters):
            return list(state.trainable)
        return [p for p, is_adapter in zip(state.trainable, state.adapters) if not is_adapter]

    def materialize(self, state: StepState) -> None:
        params = self._masked(state)
        for key in ("theta0", "importance_pre", "grad_sum"):
            state.buffers(key, params, _zeros_fp32)

    def before_update(self, state: StepState) -> None:
        params = self._masked(state)
        if not params:
            self._warn_nothing_masked()
            return
        # anchors of the first step (read in after_update): set on step 0, or when they were never created
        fresh = state.step == 0 or any(state.position(p) not in state.store.get("theta0", {}) for p in params)
        theta0 = locals_(state.buffers("theta0", params, _zeros_fp32))
        i_pre = locals_(state.buffers("importance_pre", params, _zeros_fp32))
        if fresh:
            with torch.no_grad():
                weights = [local(p).detach() for p in params]
                torch._foreach_copy_(theta0, [w.to(t.dtype) for w, t in zip(weights, theta0)])
                torch._foreach_copy_(i_pre, [s.to(t.dtype) for s, t in zip(psi_all(weights, params), i_pre)])
        acc = locals_(state.buffers("grad_sum", params, _zeros_fp32))
        grads = [local(p.grad).to(a.dtype) if p.grad is not None else torch.zeros_like(a) for p, a in zip(params, acc)]
        grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
        torch._foreach_add_(acc, grads)

    @torch.no_grad()
    def after_update(self, state: StepState) -> None:
        params = self._masked(state)
        if not params:
            return
        theta0 = locals_(state.buffers("theta0", params))
        i_pre = locals_(state.buffers("importance_pre", params))
        acc = locals_(state.buffers("grad_sum", params))
        coefs = self.coefficients_all(i_pre, psi_all(acc, params), params)
        dtype = coefs[0].dtype
        for p, t0, coef in zip(params, theta0, coefs):
            w = local(p)
            w.copy_(torch.lerp(t0, w.to(t0.dtype), coef).to(w.dtype))
        kept = reduce_rows_(_vector([c.sum().to(dtype) for c in coefs]), params)
        state.metrics["update_fraction"] = torch.stack([k / p.numel() for k, p in zip(kept.unbind(), params)]).mean()

    @staticmethod
    def coefficients_all(i_pre: list[torch.Tensor], i_ft: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`coefficients` of every tensor; the entries may be local shards of the sharded ``like`` tensors,
        whose ``mean(c0[c0 != 0])`` then comes from one reduction over the mesh (none when nothing is sharded), per
        device."""
        return _per_device(ImportanceMask._coefficients_all, i_pre, i_ft, like)

    @staticmethod
    def _coefficients_all(i_pre: list[torch.Tensor], i_ft: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
        sel = [f > p for f, p in zip(i_ft, i_pre)]
        c0 = [torch.where(s, f / (p + f).clamp_min(torch.finfo(f.dtype).tiny), torch.zeros_like(f))
              for s, f, p in zip(sel, i_ft, i_pre)]
        dtype = c0[0].dtype
        sums = reduce_rows_(torch.stack([torch.stack([c.sum().to(dtype), s.sum().to(dtype)]) for c, s in zip(c0, sel)]), like)
        out = []
        for s, c, (total, count) in zip(sel, c0, sums.unbind()):
            mean_nz = total / count.clamp_min(1)
            out.append(torch.where(s, (c / mean_nz.clamp_min(torch.finfo(c.dtype).tiny)).clamp_max(1.0), torch.zeros_like(c)))
        return out

    @staticmethod
    def coefficients(i_pre: torch.Tensor, i_ft: torch.Tensor) -> torch.Tensor:
        """``c = min(1, c0 / mean(c0[c0 != 0]))`` with ``c0 = I_ft / (I_pre + I_ft)`` where ``I_ft > I_pre``."""
        return ImportanceMask.coefficients_all([i_pre], [i_ft], [i_pre])[0]


def _zeros_fp32(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))


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
