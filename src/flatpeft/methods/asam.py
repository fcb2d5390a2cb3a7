"""``asam``: adaptive SAM (Kwon et al., ICML 2021). 2 passes.

``e_p = rho * T_p^2 g_p / ||T g||`` with ``T_p = |theta_p| + eta`` element-wise (docs/algorithms.md, "ASAM").
Defaults ``rho = 0.5``, ``eta = 0.01``: the official SamsungLabs/ASAM values. ``eta > 0`` matters for LoRA, whose
``B`` starts at 0 (with ``eta = 0`` it would never be perturbed early on). flatpeft applies ``T`` to every
trainable tensor (the official code exempts biases).
"""
from flatpeft._checks import non_negative, positive_int
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import chain
from flatpeft.perturb.rules import GradientAscent, Rule
from flatpeft.perturb.transforms import normalize_global, scale_by_param_abs, scale_by_rho


def build(eta: float = 0.01, ascent_every: int = 1) -> list[Rule]:
    non_negative("eta", eta)
    positive_int("ascent_every", ascent_every)
    return [
        GradientAscent(chain(scale_by_param_abs(eta), normalize_global(), scale_by_param_abs(eta), scale_by_rho()),
                       every=ascent_every)
    ]


register_method(
    MethodInfo("asam", build, defaults={"rho": 0.5}, summary="adaptive SAM: e = rho T^2 g / ||T g||, T = |w| + eta",
               reference="Kwon et al. 2021", sources={"rho": "SamsungLabs/ASAM", "eta": "SamsungLabs/ASAM"},
               perturbs="every trainable tensor with a gradient",
               memory="transient: one copy of the trainable tensors during pass 2")
)
