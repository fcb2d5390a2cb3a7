"""``sam``: SAM over all trainable tensors (Foret et al., ICLR 2021); on a LoRA model this is LoRA-SAM. 2 passes.

``e_p = rho * g_p / (||g|| + 1e-12)`` with one global norm over every trainable tensor with a gradient; the
update gradient is taken at ``w + e`` (docs/algorithms.md, "SAM" and "LoRA-SAM").
Default ``rho = 0.05`` (davda54/sam; FlatPO's VLM default).
"""
from flatpeft._checks import positive_int
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import chain
from flatpeft.perturb.rules import GradientAscent, Rule
from flatpeft.perturb.transforms import normalize_global, scale_by_rho


def build(ascent_every: int = 1) -> list[Rule]:
    """``ascent_every = k > 1``: compute the ascent step every k steps and reuse it in between (one pass)."""
    positive_int("ascent_every", ascent_every)
    return [GradientAscent(chain(normalize_global(), scale_by_rho()), every=ascent_every)]


register_method(MethodInfo("sam", build, defaults={"rho": 0.05}, summary="SAM / LoRA-SAM: e = rho g / ||g||", reference="Foret et al. 2021",
                           sources={"rho": "davda54/sam default; FlatPO VLM configs"},
                           perturbs="every trainable tensor with a gradient",
                           memory="transient: one copy of the trainable tensors during pass 2"))
