"""Radius schedules ``rho_t`` (docs/algorithms.md, "Flat-LoRA", rho schedule).

``cosine``: ``rho_t = rho_min + (rho - rho_min) * (1 + cos(pi t / T)) / 2`` (the only public Flat-LoRA
(Deng et al.) code decays 0.05 -> 0.02 this way); ``linear``: ``rho + (rho_min - rho) t / T``;
``constant``: ``rho``. ``t`` is the number of completed optimizer steps and ``T = total_steps``; without
``total_steps`` every schedule is constant. Computed on the host from host integers (no device sync).
"""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "scheduled", "cosine_ramp"]

SCHEDULES = ("constant", "cosine", "linear")


def scheduled(value: float, step: int, total_steps: int | None, schedule: str, final: float) -> float:
    """Value of a decaying schedule from ``value`` (t = 0) to ``final`` (t = total_steps)."""
    if schedule == "constant" or not total_steps:
        return value
    t = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "cosine":
        return final + (value - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return value + (final - value) * t
    raise ValueError(f"Invalid rho_schedule: {schedule!r}; valid: {', '.join(SCHEDULES)}")


def cosine_ramp(step: int, total_steps: int | None) -> float:
    """Flat-LoRA (Li et al.) noise ramp ``f_t = (1 - cos(pi t / T)) / 2`` from 0 to 1; 1 without ``total_steps``."""
    if not total_steps:
        return 1.0
    t = min(max(step / total_steps, 0.0), 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * t))
