"""``flatpo``: FlatPO (arXiv 2606.10488): SAM that perturbs only the sharpest fraction of PEFT tensors. 2 passes.

The eligible set ``E`` is, by default (``scope="adapters"``), the PEFT adapter tensors with a gradient (LoRA A/B and
their variants, prompt/prefix embeddings: :func:`flatpeft.adapters.lora.adapter_parameters`), as in the FlatPO
reference, whose optimizer sees only PEFT tensors; a trained classifier head, a ``modules_to_save`` copy or a
fully trained projector is updated normally and never perturbed. ``scope="all"`` ranks every trainable tensor. A
model without any PEFT adapter tensor (full fine-tuning) ranks every trainable tensor either way.

``N = ||g_E||`` over the eligible tensors (``normalize_over="all"``, the reference behaviour; the realised radius is
then ``rho ||g_S|| / ||g_E||``) or over the selected ones (``"selected"``: radius exactly rho); the selected set
``S`` is the top ``k = max(1, floor(fraction * |E|))`` tensors by gradient norm (``granularity="tensor"``, the
paper's unit) or entries by ``|g|`` (``"element"``), recomputed every step, or ``k`` drawn at random
(``selection="random"``, the paper's ablation, seeded by ``(seed, step)``); ``e_p = rho g_p / N`` for ``p`` in
``S``, 0 elsewhere; every trainable tensor is updated with the gradient at ``w + e`` (docs/algorithms.md,
"FlatPO"). Defaults: ``rho = 0.05`` (FlatPO VLM configs), ``fraction = 0.05``, ``selection = "topk"``,
``granularity = "tensor"``, ``normalize_over = "all"``, ``scope = "adapters"``.
"""
from flatpeft._checks import in_range, one_of, positive_int
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import chain
from flatpeft.perturb.rules import GradientAscent, Rule
from flatpeft.perturb.transforms import normalize_global, scale_by_rho, select_top_fraction


def sparse_direction(fraction: float, selection: str, granularity: str, normalize_over: str, refresh_every: int = 1):
    """FlatPO's perturbation of the eligible tensors: top (or random) fraction of ``rho g / N`` (selection made
    every ``refresh_every`` steps)."""
    in_range("fraction", fraction, 0.0, 1.0, low_open=True, high_open=False)
    one_of("selection", selection, ("topk", "random"))
    one_of("granularity", granularity, ("tensor", "element"))
    one_of("normalize_over", normalize_over, ("all", "selected"))
    positive_int("refresh_every", refresh_every)
    select = select_top_fraction(fraction, selection, granularity, refresh_every)
    if normalize_over == "all":
        return chain(normalize_global(), select, scale_by_rho())
    return chain(select, normalize_global(), scale_by_rho())


def build(fraction: float = 0.05, selection: str = "topk", granularity: str = "tensor", normalize_over: str = "all",
          scope: str = "adapters", ascent_every: int = 1) -> list[Rule]:
    one_of("scope", scope, ("adapters", "all"))
    positive_int("ascent_every", ascent_every)
    transform = sparse_direction(fraction, selection, granularity, normalize_over)
    return [GradientAscent(transform, target="adapters" if scope == "adapters" else "trainable", every=ascent_every)]


register_method(
    MethodInfo("flatpo", build, defaults={"rho": 0.05},
               summary="FlatPO: SAM on the sharpest fraction of PEFT adapter tensors",
               reference="arXiv 2606.10488",
               sources={"rho": "FlatPO VLM configs", "fraction": "FlatPO (5 %)", "selection": "FlatPO",
                        "granularity": "FlatPO (whole tensors)", "normalize_over": "FlatPO reference code",
                        "scope": "FlatPO reference (its optimizer sees only PEFT tensors)"},
               perturbs="the selected adapter tensors (top 5 % by gradient norm)",
               ranks="PEFT adapter tensors (scope='adapters', default); every trainable tensor with scope='all'",
               memory="transient: one copy of the eligible tensors during pass 2")
)
