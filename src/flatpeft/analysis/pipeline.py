"""The full sharpness analysis of one trained adapter (what ``flatpeft analyze`` runs).

``analyze_model`` builds a :class:`HessianOperator` on the trainable tensors and runs, in order: the loss and
gradient, the top-k Hessian eigenvalues (``eigsh``, ``which="LA"``), Hutchinson trace + diagonal, per-tensor
scores (gradient norm, Hessian diagonal sum, loss increase of a per-tensor and a global rho-step), the
concentration curves (``grad_sq`` and ``hess_diag`` scores, tensor and element granularity), the worst-case
sharpness in the SAM ball and in the ASAM ball, and the 1-D / 2-D filter-normalised landscape slices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .eigen import top_eigenpairs
from .landscape import landscape_1d, landscape_2d, plot_concentration, plot_landscape_1d, plot_landscape_2d
from .operators import HessianOperator, LossFn, use_eager_attention
from .results import AnalysisResult
from .scores import concentration_curves, tensor_scores
from .sharpness import worst_case_sharpness
from .trace import hutchinson

__all__ = ["AnalysisSettings", "SharpnessReport", "analyze_model", "flatpo_selection_share", "write_report"]


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """Settings of :func:`analyze_model` (all have defaults; validated in ``__post_init__``)."""

    top_k: int = 3
    """Number of top Hessian eigenvalues (eigsh, which="LA")."""
    eig_tol: float = 1e-3
    """ARPACK relative tolerance."""
    hutchinson_samples: int = 32
    """Rademacher probes for the trace and the diagonal."""
    rho: float = 0.05
    """Radius of the rho-step scores and of the SAM-ball worst-case sharpness."""
    adaptive_rho: float = 0.5
    """Radius of the ASAM-ball worst-case sharpness (ASAM's default rho)."""
    eta: float = 0.01
    """ASAM offset in T = |theta| + eta."""
    ascent_steps: int = 5
    """Projected gradient-ascent steps of the worst-case estimate."""
    landscape_radius: float = 1.0
    """Half-width of the landscape grids (in units of the filter-normalised direction)."""
    landscape_points_1d: int = 21
    landscape_points_2d: int = 11
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.hutchinson_samples < 2:
            raise ValueError(f"hutchinson_samples must be >= 2 (standard error), got {self.hutchinson_samples}")
        for name in ("rho", "adaptive_rho", "landscape_radius"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.landscape_points_1d < 3 or self.landscape_points_2d < 3:
            raise ValueError("landscape_points_1d and landscape_points_2d must be >= 3")
        if self.ascent_steps < 0:
            raise ValueError(f"ascent_steps must be >= 0, got {self.ascent_steps}")


@dataclasses.dataclass(frozen=True)
class SharpnessReport(AnalysisResult):
    """Everything ``flatpeft analyze`` writes to ``sharpness.json``.

    ``concentration`` maps granularity (``tensor``, ``element``) to ``[percent_of_dimensions,
    share_of_sharpness]`` pairs for the exact ``grad_sq`` score; ``concentration_hess_diag`` is the same for
    the Hutchinson ``|H_ii|`` score.
    """

    num_parameters: int
    num_tensors: int
    num_batches: int
    loss: float
    top_eigenvalues: tuple[float, ...]
    eigen: dict[str, Any]
    trace: float
    trace_std_error: float
    tensors: dict[str, Any]
    concentration: dict[str, list[list[float]]]
    concentration_hess_diag: dict[str, list[list[float]]]
    share_at_5_percent: dict[str, float]
    flatpo_selection_share: dict[str, float]
    worst_case: dict[str, Any]
    worst_case_adaptive: dict[str, Any]
    landscape_1d: dict[str, Any]
    landscape_2d: dict[str, Any]
    settings: dict[str, Any]
    timings_s: dict[str, float]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"json": False})
    elements: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, metadata={"json": False})


def analyze_model(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    eager_attention: bool = True,
) -> SharpnessReport:
    """Run the whole analysis on the trainable tensors of ``model`` at the batches ``batches``.

    With ``eager_attention`` a Hugging Face model is switched to eager attention (double backward).
    Parameters are left bit-identical; the model's train/eval mode is restored.
    """
    if eager_attention:
        use_eager_attention(model)
    op = HessianOperator(model, loss_fn, batches)
    s = settings
    timings: dict[str, float] = {}

    def tick(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    loss, grads = op.gradient()
    tick("gradient", t0)

    t0 = time.perf_counter()
    k = min(s.top_k, op.dim - 1)
    eig = top_eigenpairs(op, k, tol=s.eig_tol, seed=s.seed, progress=s.progress)
    tick("eigsh", t0)

    t0 = time.perf_counter()
    trace, diag = hutchinson(op, s.hutchinson_samples, seed=s.seed, progress=s.progress)
    tick("hutchinson", t0)

    t0 = time.perf_counter()
    scores = tensor_scores(op, rho=s.rho, gradient=(loss, grads), diagonal=diag, progress=s.progress)
    tick("tensor_scores", t0)

    grad_flat = op.flatten(grads)
    curves = concentration_curves(grad_flat**2, op.numels, score="grad_sq")
    curves_h = concentration_curves(np.abs(diag.diagonal), op.numels, score="hess_diag_abs")

    t0 = time.perf_counter()
    wc = worst_case_sharpness(op, s.rho, steps=s.ascent_steps, seed=s.seed, progress=s.progress)
    wca = worst_case_sharpness(
        op, s.adaptive_rho, steps=s.ascent_steps, adaptive=True, eta=s.eta, seed=s.seed, progress=s.progress
    )
    tick("worst_case", t0)

    t0 = time.perf_counter()
    l1 = landscape_1d(op, radius=s.landscape_radius, num=s.landscape_points_1d, seed=s.seed, progress=s.progress)
    l2 = landscape_2d(op, radius=s.landscape_radius, num=s.landscape_points_2d, seed=s.seed, progress=s.progress)
    tick("landscape", t0)

    tensors = scores.to_dict()
    tensors["hess_diag_std_error"] = [
        float(np.sqrt(x)) for x in _tensor_sums(diag.std_error**2, op.numels)
    ]
    return SharpnessReport(
        num_parameters=op.dim,
        num_tensors=len(op.params),
        num_batches=len(op.batches),
        loss=float(loss),
        top_eigenvalues=eig.eigenvalues,
        eigen=eig.to_dict(),
        trace=trace.trace,
        trace_std_error=trace.std_error,
        tensors=tensors,
        concentration={g: [list(p) for p in c.points] for g, c in curves.items()},
        concentration_hess_diag={g: [list(p) for p in c.points] for g, c in curves_h.items()},
        share_at_5_percent={
            **{f"grad_sq/{g}": c.share_at(5.0) for g, c in curves.items()},
            **{f"hess_diag_abs/{g}": c.share_at(5.0) for g, c in curves_h.items()},
        },
        flatpo_selection_share=flatpo_selection_share(scores.grad_sq),
        worst_case=wc.to_dict(),
        worst_case_adaptive=wca.to_dict(),
        landscape_1d={**l1.to_dict(), "losses": l1.losses.tolist()},
        landscape_2d={**l2.to_dict(), "losses": l2.losses.tolist()},
        settings=dataclasses.asdict(s),
        timings_s=timings,
        figures={"landscape_1d": l1, "landscape_2d": l2, "concentration": curves},
        elements={
            "names": np.array(op.names),
            "numels": np.array(op.numels, dtype=np.int64),
            "gradient": grad_flat,
            "hess_diag": diag.diagonal,
            "hess_diag_std_error": diag.std_error,
        },
    )


def flatpo_selection_share(
    tensor_sharpness: Sequence[float], fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
) -> dict[str, float]:
    """Share of ``sum(tensor_sharpness)`` held by the ``max(1, floor(f n))`` sharpest tensors, per fraction f.

    This is the set FlatPO perturbs at fraction ``f`` (docs/algorithms.md, section 9) when ranked on the same
    batches; with the ``grad_sq`` score it is the share of the full SAM step's first-order loss increase.
    """
    s = np.sort(np.asarray(tensor_sharpness, dtype=np.float64))[::-1]
    total = s.sum()
    out = {}
    for f in fractions:
        k = max(1, int(np.floor(f * s.size)))
        out[f"{f:g}"] = float(s[:k].sum() / total) if total > 0 else 0.0
    return out


def _tensor_sums(flat: np.ndarray, numels: Sequence[int]) -> np.ndarray:
    bounds = np.cumsum([0, *numels])
    return np.array([flat[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])


def write_report(report: SharpnessReport, out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """Write ``sharpness.json``, the per-element scores ``sharpness_elements.npz`` (tensor ``names``, ``numels``,
    flat ``gradient``, ``hess_diag``, ``hess_diag_std_error``; read with ``np.load(path, allow_pickle=False)``)
    and the plots ``landscape_1d.png``, ``landscape_2d.png``, ``concentration.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"sharpness": report.save(out_dir / "sharpness.json")}
    if report.elements:
        np.savez(out_dir / "sharpness_elements.npz", **report.elements)
        paths["elements"] = out_dir / "sharpness_elements.npz"
    figs = report.figures
    if "landscape_1d" in figs:
        paths["landscape_1d"] = plot_landscape_1d(figs["landscape_1d"], out_dir / "landscape_1d.png", title=title)
    if "landscape_2d" in figs:
        paths["landscape_2d"] = plot_landscape_2d(figs["landscape_2d"], out_dir / "landscape_2d.png", title=title)
    if "concentration" in figs:
        paths["concentration"] = plot_concentration(figs["concentration"], out_dir / "concentration.png", title=title)
    return paths
