"""Sharded parameters (FSDP2 ``fully_shard``: DTensor) in the engine.

The rules work on *local shards* wherever the maths is element-wise (perturbations, EMA, SPIDER's interpolation,
BAR's rescale: ``local(t)`` is a view of the shard, so in-place ops reach the parameter) and *reduce across the
mesh* wherever it is global: a per-tensor statistic is computed on each shard, and one collective over the vector
of all tensors' partial statistics gives the value of the whole, unsharded tensor. Plain tensors (one process,
DDP) never communicate and take exactly the code path they always took.

Only small tensors are ever gathered: LoRA ``A`` factors and their gradients (``r x in``; Flat-LoRA's ``A A^T`` and
Li's row norms need whole rows of ``A``) and per-row scales (``n`` floats per layer). Base weights are never
gathered by the optimizer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - old torch: no sharded parameters
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = ["is_dtensor", "is_sharded", "any_sharded", "local", "locals_", "reduce_rows_", "gather_dim0",
           "shard_key", "require_unsharded"]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter, its gradient or a buffer)."""
    return DTensor is not None and isinstance(t, DTensor)


def shard_key(t: torch.Tensor) -> tuple | None:
    """The process groups a statistic of ``t`` must be summed over (mesh dimensions where ``t`` is sharded), or
    None for a plain or replicated tensor."""
    if not is_dtensor(t):
        return None
    mesh = t.device_mesh
    groups = tuple(mesh.get_group(i) for i, p in enumerate(t.placements) if p.is_shard())
    return groups or None


def is_sharded(t: object) -> bool:
    return is_dtensor(t) and shard_key(t) is not None  # type: ignore[arg-type]


def any_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place ops reach the DTensor), or ``t`` itself."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def locals_(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [local(t) for t in tensors]


def reduce_rows_(vec: torch.Tensor, like: Sequence[torch.Tensor], op: str = "sum") -> torch.Tensor:
    """Complete per-tensor partial statistics: row ``i`` of ``vec`` belongs to ``like[i]``.

    Rows of sharded tensors are reduced (``op``: ``"sum"`` or ``"max"``) over the groups the tensor is sharded over,
    with one collective per distinct group (one in total under FSDP2); rows of plain tensors are left alone. No
    collective at all when nothing is sharded.
    """
    keys = [shard_key(t) for t in like]
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if not distinct:
        return vec
    rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    if len(distinct) == 1 and all(k is not None for k in keys):
        for group in distinct[0]:
            dist.all_reduce(vec, op=rop, group=group)
        return vec
    rows = list(vec.unbind(0))
    for key in distinct:
        idx = [i for i, k in enumerate(keys) if k == key]
        part = torch.stack([rows[i] for i in idx])
        for group in key:
            dist.all_reduce(part, op=rop, group=group)
        for j, i in enumerate(idx):
            rows[i] = part[j]
    vec.copy_(torch.stack(rows))
    return vec


def _dim0_layout(t: torch.Tensor) -> tuple | None:
    """``(group, world, chunk)`` when ``t`` is a DTensor sharded on dim 0 over one 1-D mesh (FSDP2's layout)."""
    if not is_dtensor(t):
        return None
    placements = t.placements
    if len(placements) != 1 or not (placements[0].is_shard() and placements[0].dim == 0):
        return None
    mesh = t.device_mesh
    world = mesh.size()
    return mesh.get_group(0), world, -(-t.shape[0] // world)


def gather_dim0(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor],
                shapes: Sequence[tuple[int, ...]] | None = None) -> list[torch.Tensor]:
    """Whole tensors from local dim-0 shards: ``tensors[i]`` holds the rows of ``like[i]``'s local shard (global
    shape ``shapes[i]``, by default ``like[i].shape``; same number of rows; any dtype). One ``all_gather`` for all
    tensors sharing FSDP2's layout; plain tensors are returned unchanged. Meant for small tensors (LoRA ``A``,
    per-row scales)."""
    shapes = [tuple(t.shape) for t in like] if shapes is None else [tuple(s) for s in shapes]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, (t, ref) in enumerate(zip(tensors, like)):
        layout = _dim0_layout(ref)
        if layout is None:
            if is_sharded(ref):
                raise NotImplementedError(
                    f"flatpeft supports sharded parameters sharded on dim 0 over a 1-D mesh (FSDP2's fully_shard); "
                    f"got placements {ref.placements}"
                )
            out[i] = t
        else:
            groups.setdefault((layout, t.dtype, t.device), []).append(i)
    for ((group, world, chunk), dtype, device), idx in groups.items():
        pieces = []
        for i in idx:
            t = tensors[i]
            rest = shapes[i][1:]
            padded = torch.zeros((chunk, *rest), dtype=dtype, device=device)
            padded[: t.shape[0]].copy_(t.reshape(t.shape[0], *rest))
            pieces.append(padded.reshape(-1))
        flat = torch.cat(pieces)
        gathered = torch.empty(world * flat.numel(), dtype=dtype, device=device)
        dist.all_gather_into_tensor(gathered, flat, group=group)
        per_rank = gathered.view(world, flat.numel())
        offset = 0
        for i in idx:
            shape = shapes[i]
            size = chunk * (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1)
            rows = per_rank[:, offset: offset + size].reshape(world * chunk, *shape[1:])
            out[i] = rows[: shape[0]]
            offset += size
    return out  # type: ignore[return-value]


def require_unsharded(tensors: Sequence[torch.Tensor], what: str) -> None:
    """``NotImplementedError`` naming ``what`` when any tensor is sharded."""
    if any_sharded(tensors):
        raise NotImplementedError(f"{what} is not supported with sharded (FSDP2 / DTensor) parameters")
