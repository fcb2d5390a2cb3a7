"""One view of an optimizer step (:class:`StepState`) and optax-style perturbation transforms (:class:`Transform`).

A *transform* is a pair of pure-ish functions, as in optax::

    init(params) -> state                                   # state: {name: [tensor per target]}
    update(updates, state, step) -> (updates, state)        # updates: one tensor per target

The chain's input is the gradient of the step's targets (zeros where a target has none); each transform receives
its own state and returns it (updated in place or replaced), and :func:`chain` threads both. ``step`` is the
:class:`StepState` restricted to the targets (``step.params``): the radius, the step number, the seed, the LoRA
factors and the metrics. A named method's perturbation is a chain, e.g. SAM is
``chain(normalize_global(), scale_by_rho())``: ``e = rho * g / ||g||``. Transforms never modify their input
updates in place. A transform's state is persistent: the rule that runs it keeps each named entry in the
optimizer's store, one tensor per target (saved by ``state_dict()``), see :func:`run_transform`.

A *rule* (:mod:`flatpeft.perturb.rules`) places transforms at fixed points of a step and sees only a
:class:`StepState`: the trainable tensors, the LoRA factors, the radius, the step, the learning rates, the
persistent buffers and the metrics of this step, never the optimizer itself.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from flatpeft.adapters.lora import LoRAFactors

__all__ = ["StepState", "Transform", "TransformState", "chain", "materialize", "stateless", "run_transform",
           "step_generator", "seed_of"]


def seed_of(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """The seed of a private generator for ``(seed, step, rank, stream)`` (a documented, fixed formula).

    ``stream`` separates independent draws of one step (e.g. one per LoRA layer).
    """
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + stream * 15_485_863 + 12_345) % (2**63 - 1)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", *, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A fresh generator seeded from :func:`seed_of`: the same draw on replay (and on every rank for rank 0)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_of(seed, step, rank, stream))
    return g


@dataclass
class StepState:
    """The one view of an optimizer step that rules and transforms act on.

    Attributes:
        trainable: every tensor the base optimizer updates, in a fixed order (buffers are keyed by position).
        names: their names.
        adapters: per trainable tensor, whether it is a PEFT adapter tensor
            (:func:`flatpeft.adapters.lora.adapter_parameters`).
        lrs: per trainable tensor, the learning rate of its parameter group (host floats, read this step).
        lora: the LoRA factors of the model (empty for non-LoRA models).
        rho: the radius of this step after the rho schedule.
        step: number of completed optimizer steps (0 on the first step).
        total_steps: the planned number of optimizer steps (None: unknown).
        seed: base seed of the method's private generators; rank: this process's rank (0 without DDP).
        store: persistent buffers, ``store[key][position]`` (saved by ``state_dict()``).
        metrics: diagnostics of this step (device tensors), surfaced as ``opt.metrics``.
        params / param_names: the targets a transform acts on (set by :meth:`on`; empty for the whole step).
    """

    trainable: list[torch.Tensor]
    names: list[str]
    adapters: list[bool]
    lrs: list[Any]
    lora: Sequence[LoRAFactors]
    rho: float
    step: int
    total_steps: int | None
    seed: int
    rank: int
    store: dict[str, dict[int, torch.Tensor]]
    metrics: dict[str, torch.Tensor]
    _index: dict[int, int] = field(default_factory=dict, repr=False)
    params: list[torch.Tensor] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self._index:
            self._index = {id(p): i for i, p in enumerate(self.trainable)}

    @classmethod
    def of(cls, params: Sequence[torch.Tensor], *, rho: float = 0.0, step: int = 0, seed: int = 0,
           names: Sequence[str] | None = None, lora: Sequence[LoRAFactors] = ()) -> "StepState":
        """A stand-alone step over ``params`` (to run a transform outside an optimizer, e.g. in a test)."""
        params = list(params)
        names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        return cls(params, names, [False] * len(params), [0.0] * len(params), lora, rho, step, None, seed, 0, {}, {},
                   params=params, param_names=names)

    def position(self, p: torch.Tensor) -> int:
        """Position of ``p`` among the trainable tensors."""
        try:
            return self._index[id(p)]
        except KeyError:
            raise KeyError(
                f"a tensor of shape {tuple(p.shape)} is not among the optimizer's parameters; the method needs it there "
                "(pass the model, or all of its trainable parameters, to create_optimizer)"
            ) from None

    def lr_of(self, p: torch.Tensor) -> Any:
        """Learning rate of the parameter group holding ``p``."""
        return self.lrs[self.position(p)]

    def buffers(self, key: str, params: Sequence[torch.Tensor], init: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Persistent per-tensor buffers named ``key`` (created with ``init`` on first use)."""
        slot = self.store.setdefault(key, {})
        out = []
        for p in params:
            i = self.position(p)
            if i not in slot:
                if init is None:
                    raise RuntimeError(f"flatpeft buffer {key!r} of {self.names[i]} was never initialised")
                slot[i] = init(p)
            out.append(slot[i])
        return out

    def generator(self, device: torch.device | str = "cpu", stream: int = 0, *, per_rank: bool = False) -> torch.Generator:
        """A private generator of this step (never the global RNG); identical on every rank unless ``per_rank``."""
        return step_generator(self.seed, self.step, device, rank=self.rank if per_rank else 0, stream=stream)

    def targets(self, kind: str, *, with_grad_only: bool = True) -> tuple[list[torch.Tensor], list[str]]:
        """The tensors a rule acts on: ``"trainable"``, ``"adapters"`` (PEFT adapter tensors; every trainable
        tensor when the model has none) or ``"lora_B"``; by default only those with a gradient."""
        if kind == "lora_B":
            return [f.B for f in self.lora], [f.name for f in self.lora]
        if kind not in ("trainable", "adapters"):
            raise ValueError(f"Invalid target: {kind!r}; valid: 'trainable', 'adapters', 'lora_B'")
        use_adapters = kind == "adapters" and any(self.adapters)
        pairs = [
            (p, n)
            for p, n, is_adapter in zip(self.trainable, self.names, self.adapters)
            if (not use_adapters or is_adapter) and (not with_grad_only or p.grad is not None)
        ]
        return [p for p, _ in pairs], [n for _, n in pairs]

    def on(self, kind: str, *, with_grad_only: bool = True) -> "StepState":
        """This step restricted to the targets ``kind`` (see :meth:`targets`): what a transform sees."""
        params, names = self.targets(kind, with_grad_only=with_grad_only)
        return dataclasses.replace(self, params=params, param_names=names)


TransformState = dict[str, list[torch.Tensor]]
"""A transform's state: named lists of tensors, one per target (empty for a stateless transform)."""


class Transform(NamedTuple):
    """An optax-style gradient transformation: ``init(params) -> state`` and
    ``update(updates, state, step) -> (updates, state)`` (see the module docstring)."""

    init: Callable[[list[torch.Tensor]], TransformState]
    update: Callable[[list[torch.Tensor], TransformState, StepState], tuple[list[torch.Tensor], TransformState]]
    name: str = "transform"


def stateless(fn: Callable[[list[torch.Tensor], StepState], list[torch.Tensor]], name: str | None = None) -> Transform:
    """A :class:`Transform` without state from ``fn(updates, step) -> updates``."""

    def update(updates: list[torch.Tensor], state: TransformState, step: StepState):
        return fn(updates, step), state

    return Transform(lambda params: {}, update, name or getattr(fn, "__name__", "transform"))


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right (``chain(f, g)`` applies ``f`` then ``g``); the state is the union of the
    transforms' named states (names must not repeat), each transform seeing and returning its own part."""

    def init(params: list[torch.Tensor]) -> TransformState:
        state: TransformState = {}
        for t in transforms:
            part = t.init(params)
            clash = set(part) & set(state)
            if clash:
                raise ValueError(f"chain: state {sorted(clash)} of {t.name} repeats another transform's state")
            state.update(part)
        return state

    keys: list[list[str]] = [list(t.init([])) for t in transforms]  # names only: init on no targets is free

    def update(updates: list[torch.Tensor], state: TransformState, step: StepState):
        new: TransformState = {}
        for t, names in zip(transforms, keys):
            updates, part = t.update(updates, {k: state[k] for k in names}, step)
            new.update(part)
        return updates, new

    return Transform(init, update, "chain(" + ", ".join(t.name for t in transforms) + ")")


def run_transform(transform: Transform, updates: list[torch.Tensor], step: StepState) -> list[torch.Tensor]:
    """Run ``transform`` on ``updates`` (aligned with ``step.params``) with its persistent state.

    The state lives in the optimizer's store, one tensor per target position under each state name: entries
    missing for some targets are created by ``transform.init`` for those targets, and what ``update`` returns is
    stored back (saved by ``state_dict()``).
    """
    params = step.params
    names = materialize(transform, step)
    state = {n: [step.store[n][step.position(p)] for p in params] for n in names}
    out, new = transform.update(updates, state, step)
    for n, tensors in new.items():
        slot = step.store.setdefault(n, {})
        for p, t in zip(params, tensors):
            slot[step.position(p)] = t
    return out


def materialize(transform: Transform, step: StepState) -> list[str]:
    """Create the transform's persistent state for ``step.params`` where it is missing (on first use, and before a
    checkpoint load); returns the names of its state (none for a stateless transform)."""
    names = list(transform.init([]))  # names only: init on no targets allocates nothing
    if not names:
        return names
    missing = [p for p in step.params if any(step.position(p) not in step.store.get(n, {}) for n in names)]
    if missing:
        for n, tensors in transform.init(missing).items():
            slot = step.store.setdefault(n, {})
            for p, t in zip(missing, tensors):
                slot.setdefault(step.position(p), t)
    return names
