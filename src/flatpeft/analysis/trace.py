"""Hutchinson estimators of the Hessian trace and diagonal (Rademacher probes, seeded generator).

For Rademacher ``v`` (entries +-1 with probability 1/2, ``E[v v^T] = I``):

* trace: ``E[v^T H v] = tr(H)``; variance ``2 (||H||_F^2 - sum_i H_ii^2)``.
* diagonal (Bekas, Kokiopoulou & Saad 2007): ``E[v * (H v)] = diag(H)`` element-wise; element ``i`` has
  variance ``sum_{j != i} H_ij^2``.

Both report the standard error of the mean, ``std(samples, ddof=1) / sqrt(n)``.  One probe costs one
Hessian-vector product; the trace and the diagonal can share probes (``hutchinson``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .results import DiagonalResult, TraceResult

__all__ = ["hutchinson", "hutchinson_trace", "hutchinson_diagonal", "rademacher"]


def rademacher(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A float64 vector of independent +-1 entries drawn from ``rng``."""
    return rng.integers(0, 2, size=dim).astype(np.float64) * 2.0 - 1.0


def hutchinson(
    operator: Any, num_samples: int = 32, *, seed: int = 0, progress: bool = False
) -> tuple[TraceResult, DiagonalResult]:
    """Hutchinson trace and diagonal estimates from the same ``num_samples`` Rademacher probes.

    Args:
        operator: any object with ``dim`` and ``matvec(np.ndarray) -> np.ndarray``.
        num_samples: number of probes (>= 1; the standard error needs >= 2).
        seed: seed of the ``numpy.random.Generator`` drawing the probes.
        progress: tqdm bar over probes.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    rng = np.random.default_rng(seed)
    dim = int(operator.dim)
    traces = np.empty(num_samples)
    diag_sum = np.zeros(dim)
    diag_sq = np.zeros(dim)
    for i in tqdm(range(num_samples), desc="Hutchinson", disable=not progress, leave=False):
        v = rademacher(rng, dim)
        hv = operator.matvec(v)
        prod = v * hv
        traces[i] = prod.sum()
        diag_sum += prod
        diag_sq += prod * prod
    n = num_samples
    diag = diag_sum / n
    if n > 1:
        var = np.maximum(diag_sq - n * diag * diag, 0.0) / (n - 1)
        diag_se = np.sqrt(var / n)
        trace_se = float(traces.std(ddof=1) / np.sqrt(n))
    else:
        diag_se = np.full(dim, np.nan)
        trace_se = float("nan")
    trace = TraceResult(
        trace=float(traces.mean()), std_error=trace_se, num_samples=n, seed=seed, samples=tuple(traces.tolist())
    )
    diagonal = DiagonalResult(num_samples=n, seed=seed, trace=float(diag.sum()), diagonal=diag, std_error=diag_se)
    return trace, diagonal


def hutchinson_trace(operator: Any, num_samples: int = 32, *, seed: int = 0, progress: bool = False) -> TraceResult:
    """Hutchinson estimate of ``tr(H)`` (see :func:`hutchinson`)."""
    return hutchinson(operator, num_samples, seed=seed, progress=progress)[0]


def hutchinson_diagonal(
    operator: Any, num_samples: int = 32, *, seed: int = 0, progress: bool = False
) -> DiagonalResult:
    """Hutchinson estimate of ``diag(H)`` (see :func:`hutchinson`)."""
    return hutchinson(operator, num_samples, seed=seed, progress=progress)[1]
