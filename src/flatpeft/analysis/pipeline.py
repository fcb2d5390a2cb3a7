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
from collections.abc import Callable, Sequence
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

__all__ = ["AnalysisSettings", "SharpnessReport", "analyze_model", "flatpo_selection_share", "write_report",
           "describe_plan", "plan_costs", "HVP_PER_GRADIENT", "EIGSH_HVPS_PER_EIGENVALUE"]

#: A Hessian-vector product (double backward) costs about this many gradients (measured on MiniLM, CPU).
HVP_PER_GRADIENT = 3.0
#: eigsh (ARPACK, ncv = max(2k+1, 20)) typically needs about this many HVPs per requested eigenvalue, at least 20.
EIGSH_HVPS_PER_EIGENVALUE = 20


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """Settings of :func:`analyze_model` (all have defaults; validated in ``__post_init__``)."""

    top_k: int = 0
    """Number of top Hessian eigenvalues (eigsh, which="LA"); 0 skips them (each costs ~15-25 Hessian-vector
    products)."""
    eig_tol: float = 1e-3
    """ARPACK relative tolerance."""
    hutchinson_samples: int = 0
    """Rademacher probes for the trace and the diagonal (one Hessian-vector product each); 0 skips them."""
    rho: float = 0.05
    """Radius of the rho-step scores and of the SAM-ball worst-case sharpness."""
    adaptive_rho: float = 0.5
    """Radius of the ASAM-ball worst-case sharpness (ASAM's default rho)."""
    eta: float = 0.01
    """ASAM offset in T = |theta| + eta."""
    ascent_steps: int = 2
    """Projected gradient-ascent steps of the worst-case estimate."""
    landscape_radius: float = 1.0
    """Half-width of the landscape grids (in units of the filter-normalised direction)."""
    landscape_points_1d: int = 11
    """Points of the 1-D slice (one loss evaluation each); 0 skips it."""
    landscape_points_2d: int = 0
    """Points per axis of the 2-D slice (points_2d**2 loss evaluations); 0 skips it (the default: 5 costs 25
    loss evaluations, 11 costs 121)."""
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 skips the eigenvalues), got {self.top_k}")
        if self.hutchinson_samples == 1 or self.hutchinson_samples < 0:
            raise ValueError(f"hutchinson_samples must be 0 (skip) or >= 2 (standard error), got "
                             f"{self.hutchinson_samples}")
        for name in ("rho", "adaptive_rho", "landscape_radius"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("landscape_points_1d", "landscape_points_2d"):
            if getattr(self, name) != 0 and getattr(self, name) < 3:
                raise ValueError(f"{name} must be 0 (skip) or >= 3, got {getattr(self, name)}")
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
    echo: Callable[[str], None] | None = None,
) -> SharpnessReport:
    """Run the whole analysis on the trainable tensors of ``model`` at the batches ``batches``.

    With ``eager_attention`` a Hugging Face model is switched to eager attention (double backward).
    Parameters are left bit-identical; the model's train/eval mode is restored. ``echo``: called once, after
    timing one loss evaluation and the gradient, with :func:`describe_plan`'s text (what will be computed and
    roughly how long it takes).
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
    op.loss()  # timed after the gradient, so the first call's warm-up does not inflate the estimate
    tick("loss", t0)
    if echo is not None:
        echo(describe_plan(s, op.dim, len(op.params), len(op.batches), timings["loss"], timings["gradient"]))

    k = min(s.top_k, op.dim - 1)
    eig = None
    if k >= 1:
        t0 = time.perf_counter()
        eig = top_eigenpairs(op, k, tol=s.eig_tol, seed=s.seed, progress=s.progress)
        tick("eigsh", t0)

    trace = diag = None
    if s.hutchinson_samples:
        t0 = time.perf_counter()
        trace, diag = hutchinson(op, s.hutchinson_samples, seed=s.seed, progress=s.progress)
        tick("hutchinson", t0)

    t0 = time.perf_counter()
    scores = tensor_scores(op, rho=s.rho, gradient=(loss, grads), diagonal=diag, progress=s.progress)
    tick("tensor_scores", t0)

    grad_flat = op.flatten(grads)
    curves = concentration_curves(grad_flat**2, op.numels, score="grad_sq")
    curves_h = concentration_curves(np.abs(diag.diagonal), op.numels, score="hess_diag_abs") if diag else {}

    t0 = time.perf_counter()
    wc = worst_case_sharpness(op, s.rho, steps=s.ascent_steps, seed=s.seed, progress=s.progress)
    wca = worst_case_sharpness(
        op, s.adaptive_rho, steps=s.ascent_steps, adaptive=True, eta=s.eta, seed=s.seed, progress=s.progress
    )
    tick("worst_case", t0)

    t0 = time.perf_counter()
    l1 = (landscape_1d(op, radius=s.landscape_radius, num=s.landscape_points_1d, seed=s.seed, progress=s.progress)
          if s.landscape_points_1d else None)
    l2 = (landscape_2d(op, radius=s.landscape_radius, num=s.landscape_points_2d, seed=s.seed, progress=s.progress)
          if s.landscape_points_2d else None)
    tick("landscape", t0)
    timings["total"] = round(sum(timings.values()), 3)

    tensors = scores.to_dict()
    tensors["hess_diag_std_error"] = (
        [float(np.sqrt(x)) for x in _tensor_sums(diag.std_error**2, op.numels)] if diag is not None else None
    )
    return SharpnessReport(
        num_parameters=op.dim,
        num_tensors=len(op.params),
        num_batches=len(op.batches),
        loss=float(loss),
        top_eigenvalues=eig.eigenvalues if eig is not None else (),
        eigen=eig.to_dict() if eig is not None else {},
        trace=trace.trace if trace is not None else float("nan"),
        trace_std_error=trace.std_error if trace is not None else float("nan"),
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
        landscape_1d={**l1.to_dict(), "losses": l1.losses.tolist()} if l1 is not None else {},
        landscape_2d={**l2.to_dict(), "losses": l2.losses.tolist()} if l2 is not None else {},
        settings=dataclasses.asdict(s),
        timings_s=timings,
        figures={k: v for k, v in (("landscape_1d", l1), ("landscape_2d", l2), ("concentration", curves))
                 if v is not None},
        elements={
            "names": np.array(op.names),
            "numels": np.array(op.numels, dtype=np.int64),
            "gradient": grad_flat,
            **({"hess_diag": diag.diagonal, "hess_diag_std_error": diag.std_error} if diag is not None else {}),
        },
    )


def plan_costs(settings: AnalysisSettings, num_tensors: int, loss_s: float, gradient_s: float
               ) -> list[tuple[str, str, float]]:
    """``(part, what it costs, estimated seconds)`` for each part of the analysis, from the measured time of one
    loss evaluation and one gradient (an HVP is estimated at :data:`HVP_PER_GRADIENT` gradients)."""
    s, hvp = settings, HVP_PER_GRADIENT * gradient_s
    parts = []
    if s.top_k:
        n = EIGSH_HVPS_PER_EIGENVALUE * s.top_k
        parts.append((f"top-{s.top_k} Hessian eigenvalue(s) (eigsh)", f"~{n} HVPs", n * hvp))
    if s.hutchinson_samples:
        parts.append((f"Hutchinson trace and diagonal ({s.hutchinson_samples} probes)",
                      f"{s.hutchinson_samples} HVPs", s.hutchinson_samples * hvp))
    parts.append(("per-tensor rho-step scores + concentration curves", f"{num_tensors + 1} loss evaluations",
                  (num_tensors + 1) * loss_s))
    parts.append((f"worst-case sharpness, SAM and ASAM balls ({s.ascent_steps} ascent steps)",
                  f"{2 * (s.ascent_steps + 1)} gradients + 2 loss evaluations",
                  2 * (s.ascent_steps + 1) * gradient_s + 2 * loss_s))
    if s.landscape_points_1d:
        parts.append((f"1-D landscape ({s.landscape_points_1d} points)", f"{s.landscape_points_1d} loss evaluations",
                      s.landscape_points_1d * loss_s))
    if s.landscape_points_2d:
        n = s.landscape_points_2d ** 2
        parts.append((f"2-D landscape ({s.landscape_points_2d}x{s.landscape_points_2d} points)",
                      f"{n} loss evaluations", n * loss_s))
    return parts


def describe_plan(settings: AnalysisSettings, num_parameters: int, num_tensors: int, num_batches: int,
                  loss_s: float, gradient_s: float) -> str:
    """What :func:`analyze_model` will compute and roughly how long it will take (printed before it starts)."""
    parts = plan_costs(settings, num_tensors, loss_s, gradient_s)
    total = sum(p[2] for p in parts)
    lines = [f"analyze: {num_parameters:,} trainable parameters in {num_tensors} tensors, loss over {num_batches} "
             f"batch(es); measured: one loss evaluation {loss_s:.2f} s, one gradient {gradient_s:.2f} s "
             f"(a Hessian-vector product ~{HVP_PER_GRADIENT:g}x a gradient, ~{HVP_PER_GRADIENT * gradient_s:.1f} s)",
             "will compute:"]
    lines += [f"  - {name}: {cost}, ~{_dur(sec)}" for name, cost, sec in parts]
    skipped = []
    if not settings.top_k:
        skipped.append(f"Hessian eigenvalues (--top-k N: ~{EIGSH_HVPS_PER_EIGENVALUE} HVPs each, "
                       f"~{_dur(EIGSH_HVPS_PER_EIGENVALUE * HVP_PER_GRADIENT * gradient_s)} for N=1)")
    if not settings.hutchinson_samples:
        skipped.append(f"Hutchinson trace (--hutchinson-samples N: N HVPs, ~{_dur(8 * HVP_PER_GRADIENT * gradient_s)} "
                       "for N=8)")
    if not settings.landscape_points_2d:
        skipped.append(f"2-D landscape (--points-2d N: N*N loss evaluations, ~{_dur(25 * loss_s)} for N=5)")
    if skipped:
        lines.append("skipped (flags turn them on): " + "; ".join(skipped))
    lines.append(f"estimated total: ~{_dur(total)} (rough: the estimate scales the two timings above)")
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


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


def report_files(report: SharpnessReport) -> list[str]:
    """The names of the files :func:`write_report` writes for ``report``."""
    figs = report.figures
    return ["sharpness.json", *(["sharpness_elements.npz"] if report.elements else []),
            *(f"{name}.png" for name in ("landscape_1d", "landscape_2d", "concentration") if name in figs)]


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
