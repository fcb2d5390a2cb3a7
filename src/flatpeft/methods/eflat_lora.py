"""``eflat-lora``: EFlat-LoRA (Deng et al., arXiv 2508.00522): single-pass Flat-LoRA with an EMA perturbation. 1 pass.

The gradient is taken at ``B + E_bar``; the Flat-LoRA perturbation ``E_new`` computed from that gradient (clean
``B``, current ``A``) feeds ``E_bar <- beta E_bar + (1 - beta) E_new`` for the next step (shared/spec/algorithms.md
section 5). ``beta`` has the standard meaning, the weight of the past. Default ``beta = 0.1``: the only public code
(MitakeMoca/AsyFlat_LoRA) writes 0.9 for the weight of the *new* term, i.e. 0.1 in this convention. Other defaults
as ``flat-lora`` (rho 0.05 -> 0.02 cosine over ``total_steps``, global norm, damping 1e-6).
"""
from flatpeft._checks import in_range
from flatpeft.methods.flat_lora import DEFAULTS, full_space_direction
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.rules import LaggedAscent, Rule


def build(beta: float = 0.1, norm_scope: str = "global", damping: float = 1e-6) -> list[Rule]:
    in_range("beta", beta, 0.0, 1.0, low_open=False, high_open=True)
    return [LaggedAscent(full_space_direction(norm_scope, damping), beta)]


register_method(
    MethodInfo("eflat-lora", build, defaults={**DEFAULTS, "beta": 0.1}, needs_lora=True,
               summary="EFlat-LoRA: one pass at B + EMA of past Flat-LoRA perturbations",
               reference="arXiv 2508.00522; spec section 5")
)
