"""Integrations with training frameworks: :class:`SharpnessAwareTrainer` for ``transformers.Trainer``.

Imported lazily (``from flatpeft.integrations import SharpnessAwareTrainer``) so ``import flatpeft`` does not
pull in the Trainer machinery.
"""
from __future__ import annotations

from typing import Any

__all__ = ["SharpnessAwareTrainer", "base_optimizer_from_args"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flatpeft.integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'flatpeft.integrations' has no attribute {name!r}")
