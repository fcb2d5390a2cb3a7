"""``flatpo-lagged``: single-pass FlatPO (a flatpeft method; none of the reference papers has it). 1 pass.

FlatPO's sparse perturbation -- the selected fraction of the PEFT adapter tensors, ``rho g / N`` with ``N`` over
the eligible tensors -- computed from the gradient of the current step and applied on the *next* step, the way
EFlat-LoRA lags its Flat-LoRA perturbation: step ``t`` takes its (only) gradient at ``w + E_bar``, computes FlatPO's
``e_t`` from it (at the clean weights' selection rule), updates the EMA ``E_bar <- beta E_bar + (1 - beta) e_t``
and steps with the base optimizer. The selection is refreshed every ``refresh_every`` steps (kept in between), so
the EMA stays on the selected tensors when the selection is stable. Costs one forward+backward per step (about the
base optimizer's time) and two persistent fp32 copies of the eligible tensors (EMA and lagged perturbation).

Defaults: FlatPO's (``rho = 0.05``, ``fraction = 0.05``, ``scope = "adapters"``, ...), ``beta = 0.9`` (EFlat-LoRA's
default here), ``refresh_every = 1``. Experimental: no paper reports it; ``docs/results.md`` measures it.
"""
from flatpeft._checks import in_range, one_of
from flatpeft.methods.flatpo import sparse_direction
from flatpeft.optim.registry import MethodInfo, register_method
from flatpeft.perturb.rules import LaggedAscent, Rule


def build(fraction: float = 0.05, selection: str = "topk", granularity: str = "tensor", normalize_over: str = "all",
          scope: str = "adapters", beta: float = 0.9, refresh_every: int = 1) -> list[Rule]:
    one_of("scope", scope, ("adapters", "all"))
    in_range("beta", beta, 0.0, 1.0, low_open=False, high_open=True)
    transform = sparse_direction(fraction, selection, granularity, normalize_over, refresh_every)
    return [LaggedAscent(transform, target="adapters" if scope == "adapters" else "trainable", beta=beta)]


register_method(
    MethodInfo("flatpo-lagged", build, defaults={"rho": 0.05},
               summary="single-pass FlatPO: the sparse FlatPO perturbation lagged by one step through an EMA (flatpeft)",
               reference="flatpeft (FlatPO arXiv 2606.10488 + EFlat-LoRA's lag, arXiv 2508.00522)",
               sources={"rho": "FlatPO", "fraction": "FlatPO", "beta": "as eflat-lora", "refresh_every": "flatpeft"},
               perturbs="the selected adapter tensors, by the EMA of past FlatPO steps",
               ranks="PEFT adapter tensors (scope='adapters', default); every trainable tensor with scope='all'",
               memory="persistent: the EMA (the lagged perturbation), 1 x size of the eligible tensors (fp32)")
)
