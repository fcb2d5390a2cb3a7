"""``base``: the base optimizer alone (the LoRA / prefix / prompt / full fine-tuning baselines). 1 pass."""
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.rules import Rule


def build() -> list[Rule]:
    """No rule: ``step`` is the base optimizer's step on the gradient at ``w``."""
    return []


register_method(MethodInfo("base", build, summary="base optimizer only (LoRA / prefix / prompt / full FT baseline)",
                           reference="-", perturbs="nothing", memory="none"))
