"""``spider``: SPIDER importance-aware weight allocation (Huang et al., arXiv 2411.10928, ICML 2025). 1 pass.

After each base step, ``theta = theta0 + c * (theta~ - theta0)`` where ``c`` selects the entries whose
fine-tuning importance (standardised accumulated gradient magnitude) beats their pre-trained importance
(standardised initial weight magnitude); see :class:`flatpeft.perturb.rules.ImportanceMask` and
shared/spec/algorithms.md section 8. No hyper-parameters (``rho`` is ignored). Not a flatness method: an
anti-forgetting update mask, provided as a baseline.
"""
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.rules import ImportanceMask, Rule


def build() -> list[Rule]:
    return [ImportanceMask()]


register_method(
    MethodInfo("spider", build, summary="SPIDER: update only entries whose fine-tuning importance beats pre-trained importance",
               reference="arXiv 2411.10928; spec section 8")
)
