"""Integrations with training frameworks (needs the ``hf`` extra: transformers, peft, accelerate).

* :class:`SharpnessAwareTrainer`: a ``transformers.Trainer`` whose optimizer is a flatpeft method.
* :class:`SharpnessAwareMixin`: the same training step for any ``transformers.Trainer`` subclass, e.g. trl's::

      class SharpnessAwareSFTTrainer(SharpnessAwareMixin, SFTTrainer):
          pass

* :class:`SharpnessAwareCallback`: a single-pass method run from a ``TrainerCallback`` alone (hosts that take
  callbacks but not a Trainer subclass).
* :func:`unwrap_optimizer`: the flatpeft optimizer inside accelerate's ``AcceleratedOptimizer``.

Imported lazily (``from flatpeft.integrations import SharpnessAwareTrainer``) so ``import flatpeft`` does not
pull in the Trainer machinery. See ``docs/trainer.md``.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "SharpnessAwareCallback", "SharpnessAwareMixin", "SharpnessAwareTrainer", "base_optimizer_from_args", "unwrap_optimizer",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flatpeft.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flatpeft.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
