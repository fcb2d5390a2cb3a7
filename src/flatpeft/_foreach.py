"""Grouped tensor-list helpers for the hot path: no ``.item()``, no host branching on device values."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from flatpeft._dist import locals_, reduce_rows_

Tensors = Sequence[torch.Tensor]

__all__ = ["acc_dtype", "global_norm", "finite_or_zero", "sanitize_", "sq_norms", "clone_all"]


def acc_dtype(tensors: Tensors) -> torch.dtype:
    """Accumulation dtype: float64 if any tensor is float64, else float32 (norms never in bf16/fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sq_norms(tensors: Tensors, like: Tensors | None = None) -> torch.Tensor:
    """Squared L2 norm of each tensor, as one vector on the first tensor's device (no host sync).

    Norms are computed with ``torch._foreach_norm`` per dtype group, in at least float32. Sharded tensors (FSDP2
    DTensors, or local shards of the DTensors in ``like``, aligned with ``tensors``) give the norm of the whole
    tensor: local squared norms, then one all-reduce of the vector (:func:`flatpeft._dist.reduce_rows_`).
    """
    if not tensors:
        return torch.zeros(0)
    like = tensors if like is None else like
    tensors = locals_(tensors)
    out_dtype = acc_dtype(tensors)
    device = tensors[0].device
    result: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    for dt, idx in groups.items():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.promote_types(dt, torch.float32))
        for i, n in zip(idx, norms):
            result[i] = n.to(device=device, dtype=out_dtype)
    sq = torch.stack(result).square()  # type: ignore[arg-type]
    return reduce_rows_(sq, like)


def global_norm(tensors: Tensors, like: Tensors | None = None) -> torch.Tensor:
    """``sqrt(sum_p ||t_p||^2)`` over all tensors, a 0-d device tensor (float32, or float64 for float64 input);
    sharded tensors count whole (see :func:`sq_norms`)."""
    if not tensors:
        return torch.zeros(())
    return sq_norms(tensors, like).sum().sqrt()


def finite_or_zero(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value`` where ``reference`` is finite, else 0 (arithmetic select instead of a host branch)."""
    return torch.where(torch.isfinite(reference), value, torch.zeros_like(value))


def sanitize_(tensors: Tensors) -> None:
    """Replace NaN/Inf entries by 0 in place, so a non-finite gradient can never reach the weights."""
    for t in tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


def clone_all(tensors: Tensors) -> list[torch.Tensor]:
    """Detached copies of all tensors (local shards of DTensors) in one grouped kernel launch per (device, dtype)."""
    if not tensors:
        return []
    return torch._foreach_mul([t.detach() for t in locals_(tensors)], 1.0)
