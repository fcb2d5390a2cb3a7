"""Small statistics for paired method comparisons (scipy underneath).

For seeds i = 1..n paired by seed (same initialisation, data and batch order), the difference
d_i = x_i(method) - x_i(base) has mean d̄ and sample standard deviation s (ddof=1). The 95 % confidence
interval of the mean difference is d̄ ± t_{0.975, n-1} · s / sqrt(n) (Student t, ``scipy.stats.t``). A
method is called better (worse) than the base only when the whole interval lies above (below) zero;
otherwise "no significant difference". With n < 2 no interval exists and no call is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PairedDifference", "mean_std", "paired_difference", "verdict", "NO_DIFFERENCE", "TOO_FEW"]

NO_DIFFERENCE = "no significant difference"
TOO_FEW = "too few paired seeds for a CI"


@dataclass(frozen=True)
class PairedDifference:
    """Paired difference ``a - b`` over ``n`` pairs: mean, std (ddof=1) and the t confidence interval."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    verdict: str


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values) of ``values``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def verdict(ci_low: float, ci_high: float, n: int, better: str = "better than base",
            worse: str = "worse than base") -> str:
    """``better`` if the interval is above 0, ``worse`` if below, else "no significant difference"."""
    if n < 2 or math.isnan(ci_low) or math.isnan(ci_high):
        return TOO_FEW
    if ci_low > 0:
        return better
    if ci_high < 0:
        return worse
    return NO_DIFFERENCE


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of ``a - b`` with its Student-t confidence interval (pairs at equal positions)."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference: a and b need the same length, got {x.size} and {y.size}")
    d = x - y
    n = int(d.size)
    mean, std = mean_std(d)
    if n < 2:
        return PairedDifference(n, mean, std, math.nan, math.nan, confidence, TOO_FEW)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    return PairedDifference(n, mean, std, low, high, confidence, verdict(low, high, n))
