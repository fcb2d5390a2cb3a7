"""``eflat-lora``: EFlat-LoRA (Deng et al., arXiv 2508.00522): single-pass Flat-LoRA with an EMA perturbation. 1 pass.

The gradient is taken at ``B + E_bar``; the Flat-LoRA perturbation ``E_new`` computed from that gradient (clean
``B``, current ``A``) feeds ``E_bar <- beta E_bar + (1 - beta) E_new`` for the next step (docs/algorithms.md,
"EFlat-LoRA"). ``beta`` has the standard meaning of a momentum coefficient, the weight of the past.

Default ``beta = 0.9``: the paper calls beta "the momentum coefficient that determines the update rate" of an
exponential moving average *of previous perturbations*, which in the usual convention weights the past; the only
public code (MitakeMoca/AsyFlat_LoRA) puts its 0.9 on the *new* term, i.e. ``beta = 0.1`` here, an average of
barely more than the last perturbation. ``beta=0.1`` reproduces that code. Other defaults as ``flat-lora``.
"""
import torch

from flatpeft._checks import in_range
from flatpeft.methods.flat_lora import RHO_MIN_FRACTION, SCHEDULE_DEFAULTS, SOURCES, full_space_direction
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import StepState
from flatpeft.perturb.rules import LaggedAscent, Rule
from flatpeft.perturb.transforms import lora_realised_radius


def build(beta: float = 0.9, norm_scope: str = "global", damping: float | None = None) -> list[Rule]:
    in_range("beta", beta, 0.0, 1.0, low_open=False, high_open=True)
    return [LaggedAscent(full_space_direction(norm_scope, damping), target="lora_B", beta=beta, radius=full_space_radius)]


def full_space_radius(state: StepState, targets: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
    """The full-weight-space radius of B-perturbations at the current ``A`` factors (rho's metric here)."""
    return lora_realised_radius(state.lora, deltas)


register_method(
    MethodInfo("eflat-lora", build, defaults=SCHEDULE_DEFAULTS, needs_lora=True, rho_min_fraction=RHO_MIN_FRACTION,
               schedule="cosine rho decay",
               sources={**SOURCES, "beta": "paper: 'momentum coefficient' (weight of the past); third-party code = 0.1 here"},
               summary="EFlat-LoRA: one pass at B + EMA of past Flat-LoRA perturbations",
               reference="arXiv 2508.00522", perturbs="LoRA B factors (by the EMA of past Flat-LoRA steps)",
               memory="persistent: the EMA (the lagged perturbation), 1 x size of every LoRA B (fp32); transient: one copy of every B")
)
