"""Perturbation transforms: small functions on tensor lists that compose like optax transformations.

A *transform* maps a list of direction tensors (aligned with the step's target tensors) to a new list::

    Transform = Callable[[list[Tensor], StepContext], list[Tensor]]

Transforms never modify their input in place (they may modify tensors they created). A named method's
perturbation is a :func:`chain` of such transforms, e.g. SAM is
``chain(from_grad(), normalize_global(), scale_by_rho())``: ``e = rho * g / ||g||``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from flatpeft.adapters.lora import LoRAFactors

__all__ = ["StepContext", "Transform", "chain", "step_generator"]


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded from ``(seed, step)``: the same draw on every rank and on replay."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1))
    return g


@dataclass
class StepContext:
    """What a transform may read during one optimizer step.

    Attributes:
        params: the target tensors of this step (the ones that get perturbed), in a fixed order.
        names: their names, same order.
        rho: the neighbourhood radius for this step (after the rho schedule).
        step: number of completed optimizer steps (0 on the first step).
        seed: base seed for random rules; a step's generator is seeded from ``(seed, step)``.
        lora: the LoRA factors of the model (empty for non-LoRA models).
        stats: transforms may put diagnostics here (device tensors), surfaced as ``opt.metrics``.
    """

    params: list[torch.Tensor]
    names: list[str]
    rho: float
    step: int
    seed: int = 0
    lora: Sequence[LoRAFactors] = ()
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator seeded from ``(seed, step)`` (:func:`step_generator`)."""
        return step_generator(self.seed, self.step, device)


Transform = Callable[[list[torch.Tensor], StepContext], list[torch.Tensor]]


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right: ``chain(f, g)(d, ctx) == g(f(d, ctx), ctx)``."""

    def chained(dirs: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
        for t in transforms:
            dirs = t(dirs, ctx)
        return dirs

    chained.__name__ = "chain(" + ", ".join(getattr(t, "__name__", repr(t)) for t in transforms) + ")"
    return chained
