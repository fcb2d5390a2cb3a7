"""``flatpo``: FlatPO (arXiv 2606.10488): SAM that perturbs only the sharpest fraction of PEFT tensors. 2 passes.

``N = ||g||`` over all trainable tensors (``normalize_over="all"``, the reference behaviour; the realised radius is
then ``rho ||g_S|| / ||g||``) or over the selected ones (``"selected"``: radius exactly rho); the selected set ``S``
is the top ``k = max(1, floor(fraction * n))`` tensors by gradient norm (``granularity="tensor"``, the paper's unit)
or entries by ``|g|`` (``"element"``), recomputed every step, or ``k`` drawn at random (``selection="random"``,
the paper's ablation, seeded by ``(seed, step)``); ``e_p = rho g_p / N`` for ``p`` in ``S``, 0 elsewhere; every
trainable tensor is updated with the gradient at ``w + e`` (shared/spec/algorithms.md section 7).
Defaults: ``rho = 0.05`` (FlatPO VLM configs), ``fraction = 0.05``, ``selection = "topk"``,
``granularity = "tensor"``, ``normalize_over = "all"``.
"""
from flatpeft._checks import in_range, one_of
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.base import chain
from flatpeft.perturb.rules import GradientAscent, Rule
from flatpeft.perturb.transforms import from_grad, normalize_global, scale_by_rho, select_top_fraction


def build(fraction: float = 0.05, selection: str = "topk", granularity: str = "tensor", normalize_over: str = "all") -> list[Rule]:
    in_range("fraction", fraction, 0.0, 1.0, low_open=True, high_open=False)
    one_of("selection", selection, ("topk", "random"))
    one_of("granularity", granularity, ("tensor", "element"))
    one_of("normalize_over", normalize_over, ("all", "selected"))
    select = select_top_fraction(fraction, selection, granularity)
    if normalize_over == "all":
        transform = chain(from_grad(), normalize_global(), select, scale_by_rho())
    else:
        transform = chain(from_grad(), select, normalize_global(), scale_by_rho())
    return [GradientAscent(transform)]


register_method(
    MethodInfo("flatpo", build,
               defaults={"rho": 0.05, "fraction": 0.05, "selection": "topk", "granularity": "tensor", "normalize_over": "all"},
               summary="FlatPO: SAM on the sharpest fraction of PEFT tensors", reference="arXiv 2606.10488; spec section 7")
)
