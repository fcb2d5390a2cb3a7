"""Composable perturbation rules (transforms on tensor lists, and the rules that place them in a step)."""
from flatpeft.perturb.base import StepContext, Transform, chain
from flatpeft.perturb.rules import Balancedness, FilterNoise, GradientAscent, ImportanceMask, LaggedAscent, Rule, psi
from flatpeft.perturb.transforms import (
    from_grad,
    full_space_lora_perturbation,
    lora_full_space,
    normalize_global,
    scale_by_param_abs,
    scale_by_rho,
    select_top_fraction,
)

__all__ = [
    "Balancedness", "FilterNoise", "GradientAscent", "ImportanceMask", "LaggedAscent", "Rule", "StepContext",
    "Transform", "chain", "from_grad", "full_space_lora_perturbation", "lora_full_space", "normalize_global", "psi",
    "scale_by_param_abs", "scale_by_rho", "select_top_fraction",
]
