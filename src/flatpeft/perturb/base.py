"""What rules and transforms see of a step: :class:`StepState` (rules) and :class:`StepContext` (transforms).

A *transform* maps a list of direction tensors (aligned with the step's target tensors) to a new list::

    Transform = Callable[[list[Tensor], StepContext], list[Tensor]]

Transforms never modify their input in place (they may modify tensors they created). A named method's
perturbation is a :func:`chain` of such transforms, e.g. SAM is
``chain(from_grad(), normalize_global(), scale_by_rho())``: ``e = rho * g / ||g||``. Like optax's
``init``/``update`` pairs, a transform may carry state across steps: it asks ``ctx.buffers(key, init)`` for
persistent per-target tensors (created by ``init`` on first use, saved by the optimizer's ``state_dict()``);
:func:`flatpeft.perturb.transforms.ema` is one.

A *rule* (:mod:`flatpeft.perturb.rules`) places transforms at fixed points of a step and sees only a
:class:`StepState`: the trainable tensors, the LoRA factors, the radius, the step, the learning rates, the
persistent buffers and the metrics of this step, never the optimizer itself.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flatpeft.adapters.lora import LoRAFactors

__all__ = ["StepContext", "StepState", "Transform", "chain", "persistent_buffers", "returned_buffer", "step_generator",
           "seed_of"]


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
    """The narrow view of one optimizer step that rules act on.

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

    def __post_init__(self) -> None:
        if not self._index:
            self._index = {id(p): i for i, p in enumerate(self.trainable)}

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

    def context(self, kind: str, *, with_grad_only: bool = True) -> "StepContext":
        """The :class:`StepContext` a transform sees for ``kind`` (see :meth:`targets`)."""
        params, names = self.targets(kind, with_grad_only=with_grad_only)
        return StepContext(params, names, self.rho, self.step, self.seed, self.lora, self.metrics, self)


@dataclass
class StepContext:
    """What a transform may read during one optimizer step.

    Attributes:
        params: the target tensors of this step (the ones that get perturbed), in a fixed order.
        names: their names, same order.
        rho: the neighbourhood radius for this step (after the rho schedule).
        step: number of completed optimizer steps (0 on the first step).
        seed: base seed for random transforms; a step's generator is seeded from ``(seed, step)``.
        lora: the LoRA factors of the model (empty for non-LoRA models).
        stats: transforms may put diagnostics here (device tensors), surfaced as ``opt.metrics``.
        state: the step's :class:`StepState` (persistent buffers); None for a stand-alone context.
    """

    params: list[torch.Tensor]
    names: list[str]
    rho: float
    step: int
    seed: int = 0
    lora: Sequence[LoRAFactors] = ()
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    state: StepState | None = None

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator seeded from ``(seed, step)`` (:func:`step_generator`), identical on every rank."""
        return step_generator(self.seed, self.step, device)

    def buffers(self, key: str, init: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Persistent buffers ``key`` aligned with :attr:`params` (a transform's state across steps)."""
        if self.state is None:
            raise RuntimeError("a stateful transform needs a StepContext built by the optimizer (StepState.context)")
        return self.state.buffers(key, self.params, init)


Transform = Callable[[list[torch.Tensor], StepContext], list[torch.Tensor]]


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right: ``chain(f, g)(d, ctx) == g(f(d, ctx), ctx)``."""

    def chained(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        for t in transforms:
            dirs = t(dirs, ctx)
        return dirs

    chained.__name__ = "chain(" + ", ".join(getattr(t, "__name__", repr(t)) for t in transforms) + ")"
    chained.persistent = [b for t in transforms for b in persistent_buffers(t)]  # type: ignore[attr-defined]
    chained.returns = returned_buffer(transforms[-1]) if transforms else None  # type: ignore[attr-defined]
    return chained


def returned_buffer(transform: Transform) -> str | None:
    """The key of the persistent buffer a stateful transform returns as its output (``ema`` returns its ``"ema"``
    state), or None when its output is a fresh tensor: a rule that keeps the output across steps can then hold it
    once instead of copying it into a buffer of its own."""
    return getattr(transform, "returns", None)


def persistent_buffers(transform: Transform) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The persistent buffers a transform keeps across steps, as ``(key, init)``: a stateful transform lists them
    in its ``persistent`` attribute (``ctx.buffers(key, init)`` with the same key and init), so the optimizer can
    create them ahead of a checkpoint load (see :meth:`flatpeft.perturb.rules.Rule.persistent`)."""
    return list(getattr(transform, "persistent", ()))
