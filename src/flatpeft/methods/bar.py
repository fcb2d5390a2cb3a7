"""``nbar`` / ``obar``: balancedness-aware regularisation for LoRA (Li, Zhang & He, NeurIPS 2024). 1 pass.

EXPERIMENTAL: no official code was available; the updates are the derivation of shared/spec/algorithms.md
section 9 (see :class:`flatpeft.perturb.rules.Balancedness`). ``alpha = 0.2`` (third-party gBAR ``a_0``), decayed
linearly to 0 over ``total_steps`` (constant without). ``rho`` is ignored.
"""
from flatpeft._checks import non_negative
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.rules import Balancedness, Rule


def _builder(mode: str):
    def build(alpha: float = 0.2) -> list[Rule]:
        non_negative("alpha", alpha)
        return [Balancedness(mode, alpha)]

    build.__doc__ = f"{mode}: balancedness-aware regularisation (experimental)."
    return build


register_method(MethodInfo("nbar", _builder("nbar"), defaults={"alpha": 0.2}, needs_lora=True,
                           summary="nBAR (experimental): SAM's balancedness drift as a factor rescale", reference="arXiv 2410.14802; spec section 9"))
register_method(MethodInfo("obar", _builder("obar"), defaults={"alpha": 0.2}, needs_lora=True,
                           summary="oBAR (experimental): shrink the imbalance ||B||^2 - ||A||^2", reference="arXiv 2410.14802; spec section 9"))
