"""The perturbation transforms every method is built from (see :mod:`flatpeft.perturb.base`)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from flatpeft._dist import any_sharded, gather_dim0, local, locals_, reduce_rows_, require_unsharded, shard_key
from flatpeft._foreach import acc_dtype, finite_or_zero, global_norm, sanitize_, sq_norms
from flatpeft.adapters.lora import LoRAFactors
from flatpeft.perturb.base import StepContext, Transform

__all__ = [
    "from_grad",
    "normalize_global",
    "scale_by_rho",
    "scale_by_param_abs",
    "select_top_fraction",
    "lora_full_space",
    "full_space_lora_perturbation",
    "ema",
    "EPS",
]

EPS = 1e-12
"""Denominator guard of SAM-style normalisation (davda54/sam uses 1e-12)."""


def from_grad() -> Transform:
    """Direction source: the current gradient of each target tensor, ``d_p = g_p`` (zeros where ``g_p`` is None)."""

    def from_grad_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        return [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in ctx.params]

    return from_grad_


def normalize_global(eps: float = EPS) -> Transform:
    """``d_p <- d_p / (N + eps)`` with one global norm ``N = sqrt(sum_p ||d_p||^2)``.

    This is the dual vector of the L2 ball (SAM, Foret et al. 2021, eq. 2). When ``N`` is not finite (an
    fp16 overflow, a NaN loss) the result is all zeros: the perturbation is skipped, never written as NaN.
    The norm is exposed as ``ctx.stats["grad_norm"]``.
    """

    def normalize_global_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        norm = global_norm(dirs, like=ctx.params)
        ctx.stats.setdefault("grad_norm", norm)
        factor = finite_or_zero(1.0 / (norm + eps), norm)
        out = torch._foreach_mul(dirs, factor)
        sanitize_(out)
        return out

    return normalize_global_


def scale_by_rho() -> Transform:
    """``d_p <- rho_t * d_p`` with the step's (scheduled) radius ``ctx.rho``."""

    def scale_by_rho_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        return torch._foreach_mul(dirs, ctx.rho)

    return scale_by_rho_


def scale_by_param_abs(eta: float) -> Transform:
    """``d_p <- T_p * d_p`` with the ASAM normaliser ``T_p = |theta_p| + eta`` (Kwon et al., ICML 2021).

    Applied to every target tensor (flatpeft's choice; the official ASAM code exempts biases). ``eta = 0``
    gives davda54's ``adaptive=True`` convention.
    """

    def scale_by_param_abs_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        t = torch._foreach_abs([local(p).detach() for p in ctx.params])
        if eta:
            torch._foreach_add_(t, eta)
        return torch._foreach_mul(dirs, t)

    return scale_by_param_abs_


def ema(beta: float) -> Transform:
    """Stateful: ``m <- beta * m + (1 - beta) * d``, returns ``m`` (``beta`` = weight of the past; ``m_0 = 0``).

    The state ``m`` is one persistent buffer per target tensor (``ctx.buffers("ema")``, at least float32),
    saved with the optimizer. EFlat-LoRA's EMA of past perturbations (Deng et al., arXiv 2508.00522, eq. 18).
    """

    def ema_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        state = locals_(ctx.buffers("ema", _zeros_fp32))
        torch._foreach_lerp_(state, [d.to(m.dtype) for d, m in zip(dirs, state)], 1.0 - beta)
        return list(state)

    ema_.persistent = [("ema", _zeros_fp32)]  # type: ignore[attr-defined]
    ema_.returns = "ema"  # type: ignore[attr-defined]  # its output is its state (see returned_buffer)
    return ema_


def _zeros_fp32(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))


def _count(fraction: float, n: int) -> int:
    """FlatPO's ``k = max(1, floor(fraction * n))`` (at least one unit: the reference's plain floor selects
    nothing for fewer than 20 tensors, e.g. prompt tuning's single tensor)."""
    return max(1, math.floor(fraction * n + 1e-9))


def _selection_masks(dirs: list[torch.Tensor], ctx: StepContext, fraction: float, selection: str, granularity: str) -> list[torch.Tensor]:
    """Fresh 0/1 masks (float32, on the device): one scalar per tensor, or one entry per element."""
    device = dirs[0].device
    if granularity == "tensor":
        n = len(dirs)
        k = _count(fraction, n)
        if selection == "topk":
            idx = torch.topk(sq_norms(dirs, like=ctx.params), k).indices
        else:
            idx = torch.randperm(n, generator=ctx.generator(device), device=device)[:k]
        mask = torch.zeros(n, device=device, dtype=torch.float32).index_fill_(0, idx, 1.0)
        ctx.stats["selected"] = mask
        return list(mask.unbind())
    require_unsharded(ctx.params, "FlatPO's granularity='element' (a global top-k over entries); use granularity='tensor'")
    sizes = [d.numel() for d in dirs]
    total = sum(sizes)
    k = _count(fraction, total)
    if selection == "topk":
        flat = torch.cat([d.detach().reshape(-1).abs().to(device, torch.float32) for d in dirs])
        idx = torch.topk(flat, k, sorted=False).indices
    else:
        idx = torch.randperm(total, generator=ctx.generator(device), device=device)[:k]
    mask = torch.zeros(total, device=device, dtype=torch.float32).index_fill_(0, idx, 1.0)
    ctx.stats["selected"] = mask
    return [m.view_as(d) for m, d in zip(mask.split(sizes), dirs)]


def select_top_fraction(fraction: float, selection: str = "topk", granularity: str = "tensor", refresh_every: int = 1) -> Transform:
    """Keep only a fraction of the directions (FlatPO, docs/algorithms.md "FlatPO"); zero the rest.

    ``granularity="tensor"``: the unit is a whole tensor scored by ``||d_p||``; ``k = max(1, floor(f n))`` of the
    ``n`` targets are kept. ``granularity="element"``: the unit is one entry, scored by ``|d|``, ``k`` counted over
    all entries. ``selection="topk"`` keeps the ``k`` largest scores (on device, ``torch.topk``);
    ``selection="random"`` keeps ``k`` units drawn uniformly without replacement from a generator on the targets'
    device seeded by ``(seed, step)`` (the paper's random ablation; reproducible and identical on every rank).
    Exactly ``k`` units are kept (ties do not add units). The kept set is exposed as ``ctx.stats["selected"]``.
    ``refresh_every = T > 1`` makes the transform stateful: the selection is made on steps ``0, T, 2T, ...`` and
    kept (as persistent masks, ``ctx.buffers("selection")``) in between.
    """

    def init(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=p.device) if granularity == "tensor" else _zeros_fp32(p).float()

    def select_top_fraction_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        if not dirs:
            return dirs
        if refresh_every > 1:
            kept = locals_(ctx.buffers("selection", init))
            if ctx.step % refresh_every == 0:
                torch._foreach_copy_(kept, _selection_masks(dirs, ctx, fraction, selection, granularity))
            masks = kept
        else:
            masks = _selection_masks(dirs, ctx, fraction, selection, granularity)
        return torch._foreach_mul(dirs, [m.to(d.dtype) for m, d in zip(masks, dirs)])

    if refresh_every > 1:
        select_top_fraction_.persistent = [("selection", init)]  # type: ignore[attr-defined]
    return select_top_fraction_


# --------------------------------------------------------------------------------------------------
# Flat-LoRA (Deng et al., arXiv 2508.00522): full-weight-space SAM, realised in B.
# --------------------------------------------------------------------------------------------------


def _damped_inverse(k: torch.Tensor, damping: float) -> torch.Tensor:
    """``(K + lambda I)^-1`` for a batch of symmetric PSD r x r matrices, ``lambda = damping * tr(K) / r``.

    Solved in float64 with ``inv_ex`` (no error check, so no host sync), cast back to ``k.dtype``. A tiny
    absolute floor keeps ``K = 0`` (``B = 0`` at initialisation) invertible; the vectors it multiplies are then
    exactly zero, which gives the pseudo-inverse result ``0``.
    """
    r = k.shape[-1]
    k64 = k.double()
    lam = damping * k64.diagonal(dim1=-2, dim2=-1).sum(-1) / r + 1e-30
    eye = torch.eye(r, dtype=torch.float64, device=k.device)
    inv, _ = torch.linalg.inv_ex(k64 + lam[..., None, None] * eye)
    return inv.to(k.dtype)


def full_space_lora_perturbation(
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: torch.Tensor,
    damping: float = 1e-6,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed forms of Flat-LoRA's B-perturbation for a batch of L layers (only r x r solves).

    With ``W = W0 + s B A``, ``K_A = A A^T`` and ``K_B = B^T B`` (r x r, damped), the full-weight gradient
    estimate is ``G_hat = (G_1 + G_2) / 2`` where ``G_1 = g_B (A^T)^+ / s = U A`` with
    ``U = g_B K_A^-1 / s`` and ``G_2 = (B^T)^+ g_A / s = B V`` with ``V = K_B^-1 g_A / s``. Its squared norm is
    ``||G_hat||^2 = [tr(U^T U K_A) + tr(K_B V V^T) + 2 tr(U^T B V A^T)] / 4``, and moving a W-space step
    ``E_W = G_hat / ||G_hat||`` into B by least squares, ``E_B = E_W A^+ / s``, gives
    ``E_B * ||G_hat|| = (U + B V A^T K_A^-1) / (2 s)`` (docs/algorithms.md, "Flat-LoRA").

    Args: ``a`` (L, r, m), ``b`` (L, n, r), their gradients, ``scale`` (L,), all in the compute dtype.
    ``reduce``: with ``b`` / ``grad_b`` holding only some rows of ``B`` (a shard), sums partial results over the
    shards (in place; an all-reduce): ``K_B`` and the row sums of the norm are completed with it, everything else
    is row-local (``a`` and ``grad_a`` are whole).
    Returns: ``(E_B * ||G_hat||, ||G_hat||^2)`` with shapes (L, n, r) (the rows given) and (L,).
    """
    s = scale[:, None, None]
    ka = a @ a.mT
    kb = b.mT @ b
    if reduce is not None:
        kb = reduce(kb)
    ka_inv = _damped_inverse(ka, damping)
    kb_inv = _damped_inverse(kb, damping)
    u = (grad_b / s) @ ka_inv
    v = kb_inv @ (grad_a / s)
    v_at = v @ a.mT
    ut_b = u.mT @ b
    if reduce is None:
        norm_sq = 0.25 * (
            ((u @ ka) * u).sum((1, 2)) + ((kb @ v) * v).sum((1, 2)) + 2.0 * (ut_b * v_at.mT).sum((1, 2))
        )
    else:  # the terms summing over rows of B are partial on each shard
        rows = reduce(((u @ ka) * u).sum((1, 2)) + 2.0 * (ut_b * v_at.mT).sum((1, 2)))
        norm_sq = 0.25 * (rows + ((kb @ v) * v).sum((1, 2)))
    e_b = (u + b @ v_at @ ka_inv) / (2.0 * s)
    return e_b, norm_sq.clamp_min(0.0)


def _group_layers(layers: Sequence[LoRAFactors]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(layers):
        a_shape = (f.A.shape[0], f.A.numel() // max(f.A.shape[0], 1))
        b_shape = (f.B.shape[0], f.B.numel() // max(f.B.shape[0], 1))
        key = (a_shape, b_shape, f.A.dtype, f.A.device, shard_key(f.B))
        groups.setdefault(key, []).append(i)
    return groups


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A (local) factor as a matrix: rows are dim 0."""
    return t.reshape(t.shape[0], -1)


def lora_full_space(norm_scope: str = "global", damping: float = 1e-6, eps: float = EPS) -> Transform:
    """Direction source for Flat-LoRA (Deng et al.): unit-W-radius perturbations of every LoRA ``B``.

    Reads ``g_A, g_B`` of every layer in ``ctx.lora`` (targets must be the ``B`` factors, same order), builds the
    full-weight gradient estimate per layer (:func:`full_space_lora_perturbation`, batched over layers of one
    shape), normalises by ``N = sqrt(sum_l ||G_hat_l||^2)`` (``norm_scope="global"``, the recommended default) or
    per layer (``"layer"``, the third-party behaviour: each layer gets radius rho), and returns ``E_B`` with
    W-space norm 1 before :func:`scale_by_rho`. The algebra runs in float32 (float64 for float64 weights); the
    result is all zeros when ``N`` is not finite. ``ctx.stats["grad_norm"]`` is ``N``. The per-layer scales are
    put on the device once (cached), never copied from the host inside a step.
    """
    scales: dict[tuple, torch.Tensor] = {}

    def scale_tensor(layers: Sequence[LoRAFactors], idx: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(id(layers[i].A) for i in idx), tuple(layers[i].scale for i in idx), dtype, device)
        if key not in scales:
            # filled on the device from host scalars (a fill kernel, not a host-to-device copy)
            scales[key] = torch.stack([torch.full((), layers[i].scale, dtype=dtype, device=device) for i in idx])
        return scales[key]

    def lora_full_space_(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        layers = ctx.lora
        out: list[torch.Tensor | None] = [None] * len(layers)
        norm_sq: list[torch.Tensor | None] = [None] * len(layers)
        for key, idx in _group_layers(layers).items():
            cdtype = torch.promote_types(key[2], torch.float32)
            As = [layers[i].A for i in idx]
            Bs = [layers[i].B for i in idx]

            def grad_of(p: torch.Tensor) -> torch.Tensor:
                return local(p.grad) if p.grad is not None else torch.zeros_like(local(p))

            a_loc, ga_loc = locals_(As), [grad_of(p) for p in As]
            if any_sharded(As):  # A is r x in: gather the small factor and its gradient (one all-gather)
                full = gather_dim0(a_loc + ga_loc, As + As)
                a_loc, ga_loc = full[: len(As)], full[len(As):]
            a = torch.stack([_matrix(t).detach().to(cdtype) for t in a_loc])
            ga = torch.stack([_matrix(t).to(cdtype) for t in ga_loc])
            b = torch.stack([_matrix(local(p)).detach().to(cdtype) for p in Bs])
            gb = torch.stack([_matrix(grad_of(p)).to(cdtype) for p in Bs])
            reduce = None
            if key[4] is not None:  # B sharded by rows: complete the row sums over the shards
                def reduce(x: torch.Tensor, like=Bs[:1]) -> torch.Tensor:
                    return reduce_rows_(x.unsqueeze(0), like).squeeze(0)
            scale = scale_tensor(layers, idx, cdtype, a.device)
            e_b, nsq = full_space_lora_perturbation(a, b, ga, gb, scale, damping, reduce)
            for j, i in enumerate(idx):
                out[i] = e_b[j]
                norm_sq[i] = nsq[j]
        device = out[0].device if out else torch.device("cpu")
        nsq_all = torch.stack([n.to(device=device, dtype=acc_dtype(norm_sq)) for n in norm_sq])
        if norm_scope == "global":
            norm = nsq_all.sum().sqrt()
            factors = finite_or_zero(1.0 / (norm + eps), norm).expand(len(layers))
            ctx.stats.setdefault("grad_norm", norm)
        else:
            norms = nsq_all.sqrt()
            factors = finite_or_zero(1.0 / (norms + eps), norms)
            ctx.stats.setdefault("grad_norm", nsq_all.sum().sqrt())
        result = [
            (e * f.to(e.dtype)).reshape(local(layers[i].B).shape) for i, (e, f) in enumerate(zip(out, factors.unbind()))
        ]
        sanitize_(result)
        return result

    return lora_full_space_
