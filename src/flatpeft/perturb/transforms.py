"""The perturbation transforms every method is built from (see :mod:`flatpeft.perturb.base`)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flatpeft._dist import any_sharded, gather_dim0, local, locals_, reduce_rows_, require_unsharded, shard_key
from flatpeft._foreach import acc_dtype, finite_or_zero, global_norm, sanitize_, sq_norms
from flatpeft.adapters.lora import LoRAFactors
from flatpeft.perturb.base import StepState, Transform, TransformState, stateless

__all__ = [
    "normalize_global",
    "scale_by_rho",
    "scale_by_param_abs",
    "select_top_fraction",
    "lora_full_space",
    "lora_realised_radius",
    "full_space_lora_perturbation",
    "ema",
    "default_damping",
    "EPS",
]

EPS = 1e-12
"""Denominator guard of SAM-style normalisation (davda54/sam uses 1e-12)."""


def normalize_global(eps: float = EPS) -> Transform:
    """``d_p <- d_p / (N + eps)`` with one global norm ``N = sqrt(sum_p ||d_p||^2)``.

    This is the dual vector of the L2 ball (SAM, Foret et al. 2021, eq. 2). When ``N`` is not finite (an
    fp16 overflow, a NaN loss) the result is all zeros: the perturbation is skipped, never written as NaN.
    The norm is exposed as ``step.metrics["grad_norm"]``.
    """

    def normalize_global_(dirs: list[torch.Tensor], step: StepState) -> list[torch.Tensor]:
        norm = global_norm(dirs, like=step.params)
        step.metrics.setdefault("grad_norm", norm)
        factor = finite_or_zero(1.0 / (norm + eps), norm)
        out = torch._foreach_mul(dirs, factor)
        sanitize_(out)
        return out

    return stateless(normalize_global_)


def scale_by_rho() -> Transform:
    """``d_p <- rho_t * d_p`` with the step's (scheduled) radius ``step.rho``."""

    def scale_by_rho_(dirs: list[torch.Tensor], step: StepState) -> list[torch.Tensor]:
        return torch._foreach_mul(dirs, step.rho)

    return stateless(scale_by_rho_)


def scale_by_param_abs(eta: float) -> Transform:
    """``d_p <- T_p * d_p`` with the ASAM normaliser ``T_p = |theta_p| + eta`` (Kwon et al., ICML 2021).

    Applied to every target tensor (flatpeft's choice; the official ASAM code exempts biases). ``eta = 0``
    gives davda54's ``adaptive=True`` convention.
    """

    def scale_by_param_abs_(dirs: list[torch.Tensor], step: StepState) -> list[torch.Tensor]:
        t = torch._foreach_abs([local(p).detach() for p in step.params])
        if eta:
            torch._foreach_add_(t, eta)
        return torch._foreach_mul(dirs, t)

    return stateless(scale_by_param_abs_)


def ema(beta: float) -> Transform:
    """``m <- beta * m + (1 - beta) * d``, returns ``m`` (``beta`` = weight of the past; ``m_0 = 0``).

    State: ``{"ema": m}``, one tensor per target (at least float32), updated in place. An exponential moving
    average of updates as a building block (optax's ``ema``); EFlat-LoRA's average of perturbations is held by its
    rule (:class:`~flatpeft.perturb.rules.LaggedAscent`), which applies it on the next step.
    """

    def init(params: list[torch.Tensor]) -> TransformState:
        return {"ema": [_zeros_fp32(p) for p in params]}

    def update(dirs: list[torch.Tensor], state: TransformState, step: StepState):
        m = locals_(state["ema"])
        torch._foreach_lerp_(m, [d.to(t.dtype) for d, t in zip(dirs, m)], 1.0 - beta)
        return list(m), state

    return Transform(init, update, "ema")


def _zeros_fp32(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))


def _count(fraction: float, n: int) -> int:
    """FlatPO's ``k = max(1, floor(fraction * n))`` (at least one unit: the reference's plain floor selects
    nothing for fewer than 20 tensors, e.g. prompt tuning's single tensor)."""
    return max(1, math.floor(fraction * n + 1e-9))


def _selection_masks(dirs: list[torch.Tensor], ctx: StepState, fraction: float, selection: str, granularity: str) -> list[torch.Tensor]:
    """Fresh 0/1 masks (float32, on the device): one scalar per tensor, or one entry per element.

    Only targets with a gradient are candidates and count towards ``k`` (an unrouted expert or an unused layer
    is never selected and does not enlarge the selection); the others get mask 0. Which targets have a gradient
    is host-side structure, not a device value. A context whose targets have no gradient at all (directions
    passed in directly) ranks every direction.
    """
    device = dirs[0].device
    live = [i for i, p in enumerate(ctx.params) if p.grad is not None] if len(ctx.params) == len(dirs) else []
    if not live:
        live = list(range(len(dirs)))
    cand = [dirs[i] for i in live]
    if granularity == "tensor":
        k = _count(fraction, len(cand))
        if selection == "topk":
            idx = torch.topk(sq_norms(cand, like=[ctx.params[i] for i in live] if ctx.params else None), k).indices
        else:
            idx = torch.randperm(len(cand), generator=ctx.generator(device), device=device)[:k]
        picked = torch.zeros(len(cand), device=device, dtype=torch.float32).index_fill_(0, idx, 1.0)
        if len(live) == len(dirs):
            mask = picked
        else:
            mask = torch.zeros(len(dirs), device=device, dtype=torch.float32)
            mask[live] = picked
        ctx.metrics["selected"] = mask
        return list(mask.unbind())
    require_unsharded(ctx.params, "FlatPO's granularity='element' (a global top-k over entries); use granularity='tensor'")
    sizes = [d.numel() for d in cand]
    total = sum(sizes)
    k = _count(fraction, total)
    if selection == "topk":
        flat = torch.cat([d.detach().reshape(-1).abs().to(device, torch.float32) for d in cand])
        idx = torch.topk(flat, k, sorted=False).indices
    else:
        idx = torch.randperm(total, generator=ctx.generator(device), device=device)[:k]
    mask = torch.zeros(total, device=device, dtype=torch.float32).index_fill_(0, idx, 1.0)
    out = [torch.zeros_like(d, dtype=torch.float32) for d in dirs]
    for i, m in zip(live, mask.split(sizes)):
        out[i] = m.view_as(dirs[i])
    ctx.metrics["selected"] = torch.cat([o.reshape(-1) for o in out])
    return out


def select_top_fraction(fraction: float, selection: str = "topk", granularity: str = "tensor", refresh_every: int = 1) -> Transform:
    """Keep only a fraction of the directions (FlatPO, docs/algorithms.md "FlatPO"); zero the rest.

    ``granularity="tensor"``: the unit is a whole tensor scored by ``||d_p||``; ``k = max(1, floor(f n))`` of the
    ``n`` targets are kept. ``granularity="element"``: the unit is one entry, scored by ``|d|``, ``k`` counted over
    all entries. ``selection="topk"`` keeps the ``k`` largest scores (on device, ``torch.topk``);
    ``selection="random"`` keeps ``k`` units drawn uniformly without replacement from a generator on the targets'
    device seeded by ``(seed, step)`` (the paper's random ablation; reproducible and identical on every rank).
    Exactly ``k`` units are kept (ties do not add units). The kept set is exposed as ``step.metrics["selected"]``.
    ``refresh_every = T > 1`` makes the transform stateful: the selection is made on steps ``0, T, 2T, ...`` and
    kept (as its state, ``{"selection": masks}``) in between.
    """

    def init_one(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=p.device) if granularity == "tensor" else _zeros_fp32(p).float()

    def select(dirs: list[torch.Tensor], step: StepState) -> list[torch.Tensor]:
        if not dirs:
            return dirs
        masks = _selection_masks(dirs, step, fraction, selection, granularity)
        return torch._foreach_mul(dirs, [m.to(d.dtype) for m, d in zip(masks, dirs)])

    if refresh_every == 1:
        return stateless(select, "select_top_fraction")

    def update(dirs: list[torch.Tensor], state: TransformState, step: StepState):
        if not dirs:
            return dirs, state
        kept = locals_(state["selection"])
        if step.step % refresh_every == 0:
            torch._foreach_copy_(kept, _selection_masks(dirs, step, fraction, selection, granularity))
        else:  # the kept selection is this step's selection
            step.metrics["selected"] = torch.cat([m.reshape(-1) for m in kept])
        return torch._foreach_mul(dirs, [m.to(d.dtype) for m, d in zip(kept, dirs)]), state

    return Transform(lambda params: {"selection": [init_one(p) for p in params]}, update, "select_top_fraction")


# --------------------------------------------------------------------------------------------------
# Flat-LoRA (Deng et al., arXiv 2508.00522): full-weight-space SAM, realised in B.
# --------------------------------------------------------------------------------------------------


def default_damping(dtype: torch.dtype) -> float:
    """The default relative damping ``delta = max(eps^2, 1e-14)`` for factors of ``dtype`` (``eps`` its machine
    epsilon): float32 1.4e-14, float64 1e-14, float16 9.5e-7, bfloat16 6.1e-5. A singular value of a factor
    below about ``sqrt(delta)`` times its largest is below what the dtype resolves and is treated as zero; the
    floor keeps ``K + lambda I`` numerically positive definite in float64."""
    return max(torch.finfo(dtype).eps ** 2, 1e-14)


def _gram_factor(k: torch.Tensor, damping: float) -> torch.Tensor:
    """A Cholesky factor ``L`` with ``L L^T = K + mu I >= K`` for a batch of symmetric PSD r x r ``K`` (float64),
    with the smallest shift that keeps the factorisation valid: ``mu = r eps tr(K)``, or ``damping * tr(K)`` where
    that fails. Norms ``sqrt(x K x^T) <= ||x L||`` are then sums of squares (never negative by cancellation) and
    equal to a relative ``mu / k`` on an eigenvalue ``k``. ``cholesky_ex`` (no host sync); the fallback is an
    arithmetic select."""
    r = k.shape[-1]
    eye = torch.eye(r, dtype=k.dtype, device=k.device)
    trace = k.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    chol, info = torch.linalg.cholesky_ex(k + (r * torch.finfo(k.dtype).eps * trace + 1e-150) * eye)
    chol_damped, _ = torch.linalg.cholesky_ex(k + (damping * trace + 1e-150) * eye)
    return torch.where((info == 0)[..., None, None], chol, chol_damped)


def _pseudo_inverse(k: torch.Tensor, damping: float) -> torch.Tensor:
    """``X ~ K^+`` for a batch of symmetric PSD r x r matrices ``K`` (float64): ``X = X0 + lambda X0^2`` with
    ``X0 = (K + lambda I)^-1`` and ``lambda = damping * tr(K)``, the Tikhonov inverse plus one step of iterative
    refinement.

    On an eigenvalue ``k`` of ``K`` it is ``1/k`` up to a relative ``(lambda/k)^2`` (the pseudo-inverse, exact in
    float64 for eigenvalues well above ``lambda``: full-rank factors), and at most ``2/lambda`` on eigenvalues far
    below it (directions the factor does not resolve are suppressed, never divided by round-off). Continuous in
    ``K``; for ``K = 0`` the vectors it multiplies are exactly 0. ``inv_ex`` (no error check, so no host sync).
    """
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    lam = damping * k.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] + 1e-150  # the floor keeps K = 0 finite
    x0, _ = torch.linalg.inv_ex(k + lam * eye)
    x0 = 0.5 * (x0 + x0.mT)
    return x0 + lam * (x0 @ x0)


def full_space_lora_perturbation(
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scale: torch.Tensor,
    damping: float | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed forms of Flat-LoRA's B-perturbation for a batch of L layers (only r x r solves, in float64).

    With ``W = W0 + s B A``, ``K_A = A A^T``, ``K_B = B^T B`` (r x r) and their pseudo-inverses ``K^+``
    (:func:`_pseudo_inverse`), the full-weight gradient estimate is ``G_hat = (G_1 + G_2) / 2`` with
    ``G_1 = g_B (A^T)^+ / s = g_B' K_A^+ A`` and ``G_2 = (B^T)^+ g_A / s = B V``, ``g' = g / s``,
    ``V = K_B^+ g_A'``. Moving the W-space step ``G_hat`` into B by least squares, ``E_B = G_hat A^+ / s`` with
    ``A^+ = A^T K_A^+``, gives ``E_B = H K_A^+ / (2 s)`` where ``H = g_B' + B (V A^T)`` (n x r).

    The norm is split along the row space of ``A`` (projector ``P_A = A^T K_A^+ A``) into two sums of squares,
    never a difference of traces (which cancels in float32 for ill-conditioned factors):
    ``4 ||G_hat||^2 = ||H K_A^+ L_A||^2 + ||L_B^T Y||^2`` with ``Y = V (I - P_A)`` and ``L L^T >= K`` (:func:`_gram_factor`).
    The first term bounds the realised W-space step ``s E_B A = G_hat P_A`` from above (equal up to ``lambda``),
    so with ``E_W = rho G_hat / N`` the realised radius never exceeds ``rho``, whatever the conditioning of
    ``A`` and ``B`` (docs/algorithms.md, "Flat-LoRA").

    Args: ``a`` (L, r, m), ``b`` (L, n, r), their gradients, ``scale`` (L,); any float dtype (computed in
    float64). ``damping``: the relative ``delta`` of :func:`_pseudo_inverse` (None: :func:`default_damping` of
    ``a``'s dtype). ``reduce``: with ``b`` / ``grad_b`` holding only some rows of ``B`` (a shard), sums partial
    results over the shards (in place; an all-reduce): ``K_B`` and the row sums of the first norm term are
    completed with it, everything else is row-local (``a`` and ``grad_a`` are whole).
    Returns: ``(E_B * ||G_hat||, ||G_hat||^2)`` in float64, shapes (L, n, r) (the rows given) and (L,).
    """
    delta = default_damping(a.dtype) if damping is None else damping
    f64 = torch.float64
    a, b = a.to(f64), b.to(f64)
    s = scale.to(f64)[:, None, None]
    ga, gb = grad_a.to(f64) / s, grad_b.to(f64) / s
    kb = b.mT @ b
    if reduce is not None:
        kb = reduce(kb)
    ka = a @ a.mT
    ka_pinv, chol_a = _pseudo_inverse(ka, delta), _gram_factor(ka, delta)
    kb_pinv, chol_b = _pseudo_inverse(kb, delta), _gram_factor(kb, delta)
    v = kb_pinv @ ga
    v_at = v @ a.mT
    h_kpinv = (gb + b @ v_at) @ ka_pinv
    y = v - (v_at @ ka_pinv) @ a
    rows = ((h_kpinv @ chol_a) ** 2).sum((1, 2))
    if reduce is not None:  # the rows of H are partial on each shard
        rows = reduce(rows)
    norm_sq = 0.25 * (rows + ((chol_b.mT @ y) ** 2).sum((1, 2)))
    return h_kpinv / (2.0 * s), norm_sq


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


@dataclass
class _LayerGroup:
    """LoRA layers of one shape, dtype, device and sharding, stacked in float64 (``A`` and its gradient whole, ``B``
    and its gradient as the local rows). ``reduce`` completes a row sum over the shards of ``B`` (None: unsharded)."""

    idx: list[int]
    dtype: torch.dtype
    a: torch.Tensor
    b: torch.Tensor
    grad_a: torch.Tensor | None
    grad_b: torch.Tensor | None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None


def _grad_of(p: torch.Tensor) -> torch.Tensor:
    return local(p.grad) if p.grad is not None else torch.zeros_like(local(p))


def _float64_groups(layers: Sequence[LoRAFactors], with_grads: bool) -> list[_LayerGroup]:
    """The layers batched by :func:`_group_layers`, as float64 stacks (one all-gather of the small ``A`` factors
    and their gradients when they are sharded)."""
    groups = []
    for key, idx in _group_layers(layers).items():
        As = [layers[i].A for i in idx]
        Bs = [layers[i].B for i in idx]
        a_loc = locals_(As)
        ga_loc = [_grad_of(p) for p in As] if with_grads else []
        if any_sharded(As):  # A is r x in: gather the small factor (and its gradient) in one all-gather
            full = gather_dim0(a_loc + ga_loc, As + (As if with_grads else []))
            a_loc, ga_loc = full[: len(As)], full[len(As):]
        f64 = torch.float64
        reduce = None
        if key[4] is not None:  # B sharded by rows: complete the row sums over the shards
            def reduce(x: torch.Tensor, like=Bs[:1]) -> torch.Tensor:
                return reduce_rows_(x.unsqueeze(0), like).squeeze(0)
        groups.append(_LayerGroup(
            idx, key[2],
            torch.stack([_matrix(t).detach().to(f64) for t in a_loc]),
            torch.stack([_matrix(local(p)).detach().to(f64) for p in Bs]),
            torch.stack([_matrix(t).to(f64) for t in ga_loc]) if with_grads else None,
            torch.stack([_matrix(_grad_of(p)).to(f64) for p in Bs]) if with_grads else None,
            reduce,
        ))
    return groups


def lora_realised_radius(layers: Sequence[LoRAFactors], deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-weight-space radius ``sqrt(sum_l ||s_l E_l A_l||^2)`` of B-perturbations ``deltas`` (aligned with
    ``layers``, local rows when sharded): the step ``W`` really takes when every ``B_l`` moves by ``E_l``. Computed
    as sums of squares with ``r x r`` factors of ``A A^T`` (an upper bound, tight to ``r eps cond(A)^2``; never an
    ``n x m`` matrix), a 0-d float64 tensor (0 without layers)."""
    if not layers:
        return torch.zeros((), dtype=torch.float64)
    parts = []
    for g in _float64_groups(layers, with_grads=False):
        e = torch.stack([_matrix(local(deltas[i])).to(torch.float64) for i in g.idx])
        s = torch.stack([torch.full((), layers[i].scale, dtype=torch.float64, device=e.device) for i in g.idx])
        rows = ((e @ _gram_factor(g.a @ g.a.mT, default_damping(g.dtype))) ** 2).sum((1, 2)) * s**2
        parts.append(g.reduce(rows) if g.reduce is not None else rows)
    device = parts[0].device
    return torch.cat([p.to(device) for p in parts]).sum().sqrt()


def lora_full_space(norm_scope: str = "global", damping: float | None = None, eps: float = EPS) -> Transform:
    """Direction source for Flat-LoRA (Deng et al.): unit-W-radius perturbations of every LoRA ``B``.

    Reads ``g_A, g_B`` of every layer in ``step.lora`` (targets must be the ``B`` factors, same order), builds the
    full-weight gradient estimate per layer (:func:`full_space_lora_perturbation`, batched over layers of one
    shape), normalises by ``N = sqrt(sum_l ||G_hat_l||^2)`` (``norm_scope="global"``, the recommended default) or
    per layer (``"layer"``, the third-party behaviour: each layer gets radius rho), and returns ``E_B`` with
    W-space norm at most 1 before :func:`scale_by_rho`. The algebra runs in float64 (cast back to the factors'
    dtype, at least float32); ``damping=None`` is :func:`default_damping` of the factors' dtype. The result is all zeros when ``N`` is not finite. ``ctx.metrics["grad_norm"]`` is ``N``. The per-layer scales are
    put on the device once (cached), never copied from the host inside a step.
    """
    scales: dict[tuple, torch.Tensor] = {}

    def scale_tensor(layers: Sequence[LoRAFactors], idx: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(id(layers[i].A) for i in idx), tuple(layers[i].scale for i in idx), dtype, device)
        if key not in scales:
            # filled on the device from host scalars (a fill kernel, not a host-to-device copy)
            scales[key] = torch.stack([torch.full((), layers[i].scale, dtype=dtype, device=device) for i in idx])
        return scales[key]

    def lora_full_space_(dirs: list[torch.Tensor], ctx: StepState) -> list[torch.Tensor]:
        layers = ctx.lora
        out: list[torch.Tensor | None] = [None] * len(layers)
        norm_sq: list[torch.Tensor | None] = [None] * len(layers)
        for g in _float64_groups(layers, with_grads=True):
            idx = g.idx
            out_dtype = torch.promote_types(g.dtype, torch.float32)
            delta = default_damping(g.dtype) if damping is None else damping
            scale = scale_tensor(layers, idx, torch.float64, g.a.device)
            e_b, nsq = full_space_lora_perturbation(g.a, g.b, g.grad_a, g.grad_b, scale, delta, g.reduce)
            e_b = e_b.to(out_dtype)
            for j, i in enumerate(idx):
                out[i] = e_b[j]
                norm_sq[i] = nsq[j]
        device = out[0].device if out else torch.device("cpu")
        nsq_all = torch.stack([n.to(device=device, dtype=acc_dtype(norm_sq)) for n in norm_sq])
        if norm_scope == "global":
            norm = nsq_all.sum().sqrt()
            factors = finite_or_zero(1.0 / (norm + eps), norm).expand(len(layers))
            ctx.metrics.setdefault("grad_norm", norm)
        else:
            norms = nsq_all.sqrt()
            factors = finite_or_zero(1.0 / (norms + eps), norms)
            ctx.metrics.setdefault("grad_norm", nsq_all.sum().sqrt())
        result = [
            (e * f.to(e.dtype)).reshape(local(layers[i].B).shape) for i, (e, f) in enumerate(zip(out, factors.unbind()))
        ]
        sanitize_(result)
        return result

    return stateless(lora_full_space_)
