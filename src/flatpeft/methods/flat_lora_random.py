"""``flat-lora-random``: Flat-LoRA of Li et al. (arXiv 2409.14396, ICML 2025). 1 pass.

Filter-wise Gaussian noise on the frozen ``W0`` of every LoRA layer, ``sigma_i = f_t rho ||W[i,:]|| / sqrt(m)`` of
the merged weight, ``f_t`` a cosine ramp 0 -> 1 over ``total_steps`` (1 without), drawn from a generator seeded by
``(seed, step)``, and undone by an exact copy (frozen weights bit-identical after each step).
shared/spec/algorithms.md section 6. Defaults ``rho = 0.05``, ``seed = 0`` (nblt/Flat-LoRA README: rho 0.05, T = 1).
"""
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.rules import FilterNoise, Rule


def build() -> list[Rule]:
    return [FilterNoise()]


register_method(
    MethodInfo("flat-lora-random", build, defaults={"rho": 0.05}, needs_lora=True,
               summary="random filter-wise noise on the frozen weights of LoRA layers (Li et al.)",
               reference="arXiv 2409.14396; spec section 6")
)
