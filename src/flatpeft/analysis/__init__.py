"""Sharpness analysis of PEFT adapters: Hessian operators x algorithms, sharpness scores, landscapes.

Operators (``operators``): :class:`HessianOperator` (double-backward HVPs restricted to the trainable
tensors, averaged over batches, eval mode, scipy ``LinearOperator`` view), :class:`MatrixOperator`.
Algorithms: :func:`top_eigenpairs` (scipy ``eigsh``), :func:`hutchinson` (trace + diagonal),
:func:`tensor_scores` / :func:`concentration_curve` (``scores``), :func:`worst_case_sharpness`,
:func:`landscape_1d` / :func:`landscape_2d`.  Results are frozen dataclasses with ``to_json`` / ``save``.
The ``analyze`` and ``preference`` CLI commands live in ``flatpeft.analysis.commands``.
"""

from flatpeft._extras import require

require("analysis", "numpy", "scipy", "tqdm", part="flatpeft.analysis")

from .eigen import top_eigenpairs, top_eigenpairs_lobpcg
from .landscape import (
    filter_normalize,
    landscape_1d,
    landscape_2d,
    plot_concentration,
    plot_landscape_1d,
    plot_landscape_2d,
    random_direction,
    symmetric_grid,
)
from .operators import (
    HessianOperator,
    MatrixOperator,
    as_linear_operator,
    eval_mode,
    restore_parameters,
    trainable_parameters,
    use_eager_attention,
)
from .pipeline import AnalysisSettings, SharpnessReport, analyze_model, write_report
from .results import (
    AnalysisResult,
    ConcentrationCurve,
    DiagonalResult,
    EigenResult,
    LandscapeSlice,
    TensorScores,
    TraceResult,
    WorstCaseSharpness,
)
from .scores import concentration_curve, concentration_curves, tensor_scores, tensor_totals
from .sharpness import worst_case_sharpness
from .trace import hutchinson, hutchinson_diagonal, hutchinson_trace

__all__ = [
    "AnalysisResult",
    "AnalysisSettings",
    "ConcentrationCurve",
    "DiagonalResult",
    "EigenResult",
    "HessianOperator",
    "LandscapeSlice",
    "MatrixOperator",
    "SharpnessReport",
    "TensorScores",
    "TraceResult",
    "WorstCaseSharpness",
    "analyze_model",
    "as_linear_operator",
    "concentration_curve",
    "concentration_curves",
    "eval_mode",
    "filter_normalize",
    "hutchinson",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "landscape_1d",
    "landscape_2d",
    "plot_concentration",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "random_direction",
    "restore_parameters",
    "symmetric_grid",
    "tensor_scores",
    "tensor_totals",
    "top_eigenpairs",
    "top_eigenpairs_lobpcg",
    "trainable_parameters",
    "use_eager_attention",
    "worst_case_sharpness",
    "write_report",
]
