"""Per-tensor / per-element sharpness scores and the concentration ("flatness preference") curve.

Definitions (the FlatPO paper's claim is that a few "sharp dimensions" hold most of the sharpness; these make
the claim measurable):

* **Dimension.**  At ``"element"`` granularity one dimension is one scalar entry of a trainable tensor; at
  ``"tensor"`` granularity it is one whole trainable tensor (each LoRA ``A`` and ``B`` separately, the head
  weight, ...), which is FlatPO's unit of selection (docs/algorithms.md, section 9).  "x % of dimensions"
  counts tensors (not their elements) at tensor granularity.
* **Sharpness of an element** (default score ``"grad_sq"``): ``s_i = g_i^2`` with ``g`` the gradient of the
  batch-averaged loss.  Why: the first-order loss increase of a FlatPO/SAM step that perturbs only the set
  ``S`` with the global normalisation (``e_S = rho g_S / ||g||``) is ``rho ||g_S||^2 / ||g||``, so
  ``sum_{i in S} s_i / sum_i s_i = ||g_S||^2 / ||g||^2`` is exactly the fraction of the full SAM step's
  (first-order) loss increase that perturbing ``S`` recovers.  It is exact (no sampling).
  Alternative score ``"hess_diag"``: ``s_i = |H_ii|`` from the Hutchinson diagonal (second-order curvature
  along each coordinate; a noisy estimate, and an absolute value because the diagonal may be negative).
* **Sharpness of a tensor** = sum of its elements' sharpness (``||g_p||^2`` for ``grad_sq``), so both
  granularities share the same total; ordering tensors by ``||g_p||^2`` is FlatPO's ordering by ``||g_p||``.
* **Concentration curve**: sort the dimensions by sharpness, descending; with ``n`` dimensions and
  ``C_k`` = share of the total held by the ``k`` sharpest, the curve is the piecewise-linear interpolation of
  the points ``(100 k / n, C_k)``, ``k = 0..n``.  A uniform spread is the diagonal; a curve that jumps to 1
  early means sharpness is concentrated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .operators import HessianOperator
from .results import ConcentrationCurve, DiagonalResult, TensorScores

__all__ = [
    "DEFAULT_PERCENTS",
    "concentration_curve",
    "tensor_totals",
    "tensor_scores",
    "concentration_curves",
]

#: Percent grid used when there are more than ``max_points`` dimensions (fine near 0, where it matters).
DEFAULT_PERCENTS: tuple[float, ...] = tuple(
    sorted(set([0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]) | set(np.round(np.linspace(0, 100, 101), 6).tolist()))
)


def concentration_curve(
    scores: np.ndarray | Sequence[float],
    *,
    granularity: str,
    score: str = "grad_sq",
    percents: Sequence[float] | None = None,
    max_points: int = 1000,
) -> ConcentrationCurve:
    """Share of the total of ``scores`` held by the top x % of dimensions (see module docstring).

    Args:
        scores: non-negative per-dimension sharpness, any order.
        granularity: label stored in the result (``"tensor"`` or ``"element"``).
        score: label of the score used (e.g. ``"grad_sq"``).
        percents: where to evaluate the curve; default: every exact point ``100 k / n`` when
            ``n <= max_points``, else :data:`DEFAULT_PERCENTS` (values between exact points are linearly
            interpolated).
    Returns:
        ``ConcentrationCurve``; if the total is 0 every share is 0.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("scores must be non-empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if np.any(s < 0):
        raise ValueError(f"scores must be non-negative, got min {s.min()}")
    if granularity not in ("tensor", "element"):
        raise ValueError(f"granularity must be 'tensor' or 'element', got {granularity!r}")
    n = s.size
    total = float(s.sum())
    cum = np.concatenate([[0.0], np.cumsum(np.sort(s)[::-1])])
    shares = cum / total if total > 0 else np.zeros_like(cum)
    shares = np.minimum(shares, 1.0)
    exact_x = 100.0 * np.arange(n + 1) / n
    if percents is None:
        xs = exact_x if n <= max_points else np.asarray(DEFAULT_PERCENTS)
    else:
        xs = np.asarray(percents, dtype=np.float64)
        if np.any(xs < 0) or np.any(xs > 100):
            raise ValueError("percents must lie in [0, 100]")
    ys = np.interp(xs, exact_x, shares)
    return ConcentrationCurve(
        granularity=granularity,
        score=score,
        num_dimensions=int(n),
        total=total,
        points=tuple((float(x), float(y)) for x, y in zip(xs, ys)),
    )


def tensor_totals(flat: np.ndarray, numels: Sequence[int]) -> np.ndarray:
    """Sum a flat per-element vector within each tensor (``numels`` gives the tensor sizes, in order)."""
    flat = np.asarray(flat, dtype=np.float64).reshape(-1)
    if flat.size != int(sum(numels)):
        raise ValueError(f"flat vector has {flat.size} entries, numels sum to {sum(numels)}")
    bounds = np.cumsum([0, *numels])
    return np.array([flat[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])


def concentration_curves(
    element_scores: np.ndarray, numels: Sequence[int], *, score: str = "grad_sq"
) -> dict[str, ConcentrationCurve]:
    """Tensor- and element-granularity curves for one per-element score vector (tensor score = sum)."""
    element_scores = np.asarray(element_scores, dtype=np.float64)
    return {
        "tensor": concentration_curve(tensor_totals(element_scores, numels), granularity="tensor", score=score),
        "element": concentration_curve(element_scores, granularity="element", score=score),
    }


def tensor_scores(
    operator: HessianOperator,
    *,
    rho: float = 0.05,
    gradient: tuple[float, list[torch.Tensor]] | None = None,
    diagonal: DiagonalResult | None = None,
    rho_steps: bool = True,
    progress: bool = False,
) -> TensorScores:
    """Per-tensor sharpness scores (see ``TensorScores``).

    ``rho_increase[p] = L(theta + rho g_p / ||g_p|| on tensor p only) - L(theta)``: the loss increase of a
    SAM step restricted to that tensor at full radius ``rho`` (0 for a tensor with zero gradient); one loss
    evaluation per tensor.  ``global_rho_increase`` is the same for the SAM step over all tensors.
    Parameters are restored bit-exactly after every evaluation.
    """
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    loss, grads = gradient if gradient is not None else operator.gradient()
    norms = [float(torch.linalg.vector_norm(g.double())) for g in grads]
    hess = None
    if diagonal is not None:
        hess = tuple(float(x) for x in tensor_totals(diagonal.diagonal, operator.numels))
    increases = None
    global_increase = None
    if rho_steps:
        vals = []
        for i in tqdm(range(len(grads)), desc="rho-step per tensor", disable=not progress, leave=False):
            if norms[i] == 0.0:
                vals.append(0.0)
                continue
            delta = [torch.zeros_like(g) for g in grads]
            delta[i] = grads[i] * (rho / norms[i])
            vals.append(operator.loss_at(delta) - loss)
        increases = tuple(vals)
        gnorm = float(np.sqrt(sum(n * n for n in norms)))
        if gnorm > 0:
            global_increase = operator.loss_at([g * (rho / gnorm) for g in grads]) - loss
        else:
            global_increase = 0.0
    return TensorScores(
        names=operator.names,
        numels=tuple(int(n) for n in operator.numels),
        grad_norm=tuple(norms),
        grad_sq=tuple(n * n for n in norms),
        hess_diag=hess,
        rho_increase=increases,
        rho=float(rho),
        global_rho_increase=global_increase,
        loss=float(loss),
    )
