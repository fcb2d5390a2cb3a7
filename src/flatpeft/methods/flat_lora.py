"""``flat-lora``: Flat-LoRA of Deng et al. (arXiv 2508.00522; "FMLoRA" in v3): full-space SAM moved into B. 2 passes.

From ``g_A, g_B`` estimate the full-weight gradient ``G_hat = (g_B (A^T)^+ + (B^T)^+ g_A) / (2 s)``, take the W-space
SAM step ``E_W = rho_t G_hat / N`` and realise it in ``B`` by least squares, ``E_B = E_W A^+ / s``, with r x r solves
only (docs/algorithms.md, "Flat-LoRA"). Not to be confused with Li et al.'s Flat-LoRA (``flat-lora-random``).

Defaults: ``rho = 0.05`` decayed by ``rho_schedule = "cosine"`` over ``total_steps`` to ``rho_min = 0.4 rho``
(``rho_min=None``; the only public code decays 0.05 -> 0.02, i.e. to 40 % of rho; an explicit ``rho_min`` is an
absolute radius and may not exceed ``rho``); ``norm_scope = "global"`` (one ``N`` over all layers; ``"layer"`` is
the third-party behaviour); ``damping = None``: the relative regularisation ``delta`` of the r x r pseudo-inverses of
``A A^T`` and ``B^T B`` (``max(eps^2, 1e-14)`` for the factors' dtype; exact for full-rank factors, see
:func:`flatpeft.perturb.transforms.full_space_lora_perturbation`). Non-LoRA
trainable tensors (heads, biases) are not perturbed.
"""
from flatpeft._checks import non_negative, one_of, optional, positive_int
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import chain
from flatpeft.perturb.rules import GradientAscent, Rule
from flatpeft.perturb.transforms import lora_full_space, scale_by_rho

SCHEDULE_DEFAULTS = {"rho": 0.05, "rho_schedule": "cosine", "rho_min": None}
"""Flat-LoRA's and EFlat-LoRA's values of the common keywords (rho_min None = RHO_MIN_FRACTION * rho)."""
RHO_MIN_FRACTION = 0.4
SOURCES = {
    "rho": "MitakeMoca/AsyFlat_LoRA (rho_max 0.05)",
    "rho_schedule": "MitakeMoca/AsyFlat_LoRA (cosine); the paper's Theorem 1 motivates a decreasing rho",
    "rho_min": "MitakeMoca/AsyFlat_LoRA (0.02 = 0.4 x 0.05), made relative to rho",
    "norm_scope": "flatpeft decision (global ball, as SAM); 'layer' is the third-party code",
    "damping": "flatpeft decision (None = max(eps^2, 1e-14) of the factors' dtype: exact pseudo-inverses of full-rank factors)",
}


def full_space_direction(norm_scope: str, damping: float | None):
    """The Flat-LoRA perturbation of ``B`` at radius ``rho_t`` (shared with ``eflat-lora``)."""
    one_of("norm_scope", norm_scope, ("global", "layer"))
    optional(non_negative, "damping", damping)
    return chain(lora_full_space(norm_scope, damping), scale_by_rho())


def build(norm_scope: str = "global", damping: float | None = None, ascent_every: int = 1) -> list[Rule]:
    positive_int("ascent_every", ascent_every)
    return [GradientAscent(full_space_direction(norm_scope, damping), target="lora_B", every=ascent_every)]


register_method(
    MethodInfo("flat-lora", build, defaults=SCHEDULE_DEFAULTS, needs_lora=True, rho_min_fraction=RHO_MIN_FRACTION,
               schedule="cosine rho decay", sources=SOURCES,
               summary="full-weight-space SAM estimated from LoRA gradients, moved exactly into B (Deng et al.)",
               reference="arXiv 2508.00522", perturbs="LoRA B factors (a W-space step of radius rho_t)",
               memory="transient: one copy of every LoRA B during pass 2")
)
