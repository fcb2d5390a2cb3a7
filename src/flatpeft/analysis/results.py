"""Frozen result dataclasses of the analysis tools: operators x algorithms -> frozen results.

Every result is a frozen dataclass with ``to_dict()`` (JSON-ready: numpy arrays become lists, floats stay
floats), ``to_json()`` and ``save(path)``.  Large per-element arrays (eigenvectors, Hessian diagonals) are kept
on the object but left out of the JSON form: fields declared with ``metadata={"json": False}`` are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AnalysisResult",
    "EigenResult",
    "TraceResult",
    "DiagonalResult",
    "TensorScores",
    "ConcentrationCurve",
    "WorstCaseSharpness",
    "LandscapeSlice",
    "to_jsonable",
]


def to_jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples, dataclasses and paths to plain JSON types.

    Non-finite floats become ``None`` (JSON has no NaN/inf), so the output is strict JSON.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, AnalysisResult):
            return value.to_dict()
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors
        return to_jsonable(value.tolist())
    return value


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    """Base class: JSON serialisation of the fields not marked ``metadata={"json": False}``."""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict of this result (large array fields excluded)."""
        return {
            f.name: to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.metadata.get("json", True)
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Return ``to_dict()`` as a strict JSON string."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` (parent directories created) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path


def _hidden(**kwargs: Any) -> Any:
    return dataclasses.field(metadata={"json": False}, **kwargs)


@dataclasses.dataclass(frozen=True)
class EigenResult(AnalysisResult):
    """Top eigenpairs of a symmetric operator.

    ``eigenvalues`` are sorted descending; ``eigenvectors[:, i]`` belongs to ``eigenvalues[i]`` (unit norm,
    float64, flattened over the operator's parameters).  ``residuals[i] = ||H v_i - lambda_i v_i||``, computed
    with one extra matvec per pair after the solver returned.  ``converged`` is False when ARPACK stopped at
    ``maxiter`` (then only the converged pairs are returned).
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    converged: bool
    num_matvecs: int
    which: str
    tol: float
    eigenvectors: np.ndarray = _hidden()


@dataclasses.dataclass(frozen=True)
class TraceResult(AnalysisResult):
    """Hutchinson estimate of ``tr(H)``: the mean of ``v^T H v`` over Rademacher ``v``.

    ``std_error = std(samples, ddof=1) / sqrt(num_samples)`` (0 for one sample).
    """

    trace: float
    std_error: float
    num_samples: int
    seed: int
    samples: tuple[float, ...] = _hidden()


@dataclasses.dataclass(frozen=True)
class DiagonalResult(AnalysisResult):
    """Hutchinson estimate of ``diag(H)``: the mean of ``v * (H v)`` over Rademacher ``v`` (element-wise).

    ``std_error`` is the per-element standard error of the mean.  ``trace`` is ``diagonal.sum()``.
    """

    num_samples: int
    seed: int
    trace: float
    diagonal: np.ndarray = _hidden()
    std_error: np.ndarray = _hidden()


@dataclasses.dataclass(frozen=True)
class TensorScores(AnalysisResult):
    """Per-tensor sharpness scores of the trainable tensors (one row per tensor, same order as ``names``).

    * ``grad_norm``: ``||g_p||`` of the batch-averaged gradient (FlatPO's selection score).
    * ``grad_sq``: ``||g_p||^2``, the tensor's additive share of ``||g||^2``.
    * ``hess_diag``: Hutchinson estimate of ``sum_{i in p} H_ii`` (None if not computed).
    * ``rho_increase``: ``L(theta + rho g_p/||g_p|| on p only) - L(theta)`` (None if not computed).
    * ``global_rho_increase``: ``L(theta + rho g/||g||) - L(theta)`` (SAM step over all tensors).
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    grad_norm: tuple[float, ...]
    grad_sq: tuple[float, ...]
    hess_diag: tuple[float, ...] | None
    rho_increase: tuple[float, ...] | None
    rho: float
    global_rho_increase: float | None
    loss: float


@dataclasses.dataclass(frozen=True)
class ConcentrationCurve(AnalysisResult):
    """Share of total sharpness held by the sharpest x % of dimensions.

    ``points`` are ``(percent_of_dimensions, share_of_sharpness)`` pairs, percent in [0, 100], share in
    [0, 1], both non-decreasing, starting at (0, 0) and ending at (100, 1) (for a non-zero total).
    ``granularity`` is ``"tensor"`` or ``"element"``; ``score`` names the per-dimension sharpness used.
    """

    granularity: str
    score: str
    num_dimensions: int
    total: float
    points: tuple[tuple[float, float], ...]

    def share_at(self, percent: float) -> float:
        """Share of sharpness held by the sharpest ``percent`` % of dimensions (linear interpolation)."""
        xs = np.array([p[0] for p in self.points])
        ys = np.array([p[1] for p in self.points])
        return float(np.interp(percent, xs, ys))


@dataclasses.dataclass(frozen=True)
class WorstCaseSharpness(AnalysisResult):
    """Estimated ``max_{||eps||_T <= rho} L(theta + eps) - L(theta)``.

    ``sharpness`` is the best value seen over the start point and every projected-ascent iterate (so it is a
    lower bound of the true maximum and ``>= sam_sharpness``, the value at the SAM start point).  ``adaptive``
    selects the ASAM ball ``||eps / (|theta| + eta)|| <= rho``.  ``history`` holds the value per iterate
    (index 0 = start point).
    """

    rho: float
    adaptive: bool
    eta: float
    steps: int
    step_size: float
    loss: float
    sharpness: float
    sam_sharpness: float
    history: tuple[float, ...]
    perturbation_norm: float


@dataclasses.dataclass(frozen=True)
class LandscapeSlice(AnalysisResult):
    """Loss on a 1-D line or 2-D plane ``theta + a d1 (+ b d2)`` through the trained point.

    ``alphas`` (and ``betas`` for 2-D) are the coordinates; ``losses`` has shape ``(len(alphas),)`` or
    ``(len(alphas), len(betas))`` with ``losses[i, j] = L(theta + alphas[i] d1 + betas[j] d2)``.
    ``normalization`` is ``"filter"`` (rows rescaled to the parameter rows' norms) or ``"none"``.
    """

    alphas: tuple[float, ...]
    betas: tuple[float, ...] | None
    losses: np.ndarray
    center_loss: float
    normalization: str
    seed: int
