"""Composable perturbation rules: optax-style transforms on tensor lists, and the generic rules that place them in
a step.

Rules that belong to a single method live beside it in :mod:`flatpeft.methods` (``FilterNoise`` in
``flat_lora_random``, ``ImportanceMask`` in ``spider``, ``Balancedness`` in ``bar``).
"""
from flatpeft.perturb.base import StepState, Transform, chain, run_transform, stateless
from flatpeft.perturb.rules import GradientAscent, LaggedAscent, Rule, gradients
from flatpeft.perturb.transforms import (
    ema,
    full_space_lora_perturbation,
    lora_full_space,
    normalize_global,
    scale_by_param_abs,
    scale_by_rho,
    select_top_fraction,
)

__all__ = [
    "GradientAscent", "LaggedAscent", "Rule", "StepState", "Transform", "chain", "ema", "full_space_lora_perturbation",
    "gradients", "lora_full_space", "normalize_global", "run_transform", "scale_by_param_abs", "scale_by_rho",
    "select_top_fraction", "stateless",
]
