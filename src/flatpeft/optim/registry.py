"""Method registry and the ``create_optimizer`` factory.

A method is registered once with a :class:`MethodInfo`: its name, the keywords it accepts with their defaults
(and where each default comes from), whether it needs LoRA layers, and a ``build(**kwargs)`` that returns its
rules. ``create_optimizer`` splits the user's keywords between the method and the base optimizer and rejects
anything neither accepts, naming it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flatpeft._checks import non_negative, one_of, optional
from flatpeft.adapters.lora import find_lora_layers, require_lora_layers
from flatpeft.optim.sharpness_aware import SharpnessAware
from flatpeft.perturb.rules import Rule
from flatpeft.perturb.schedules import SCHEDULES

__all__ = ["MethodInfo", "register_method", "get_method", "create_optimizer", "method_names", "COMMON_KEYWORDS"]

COMMON_KEYWORDS: dict[str, Any] = {
    "rho": 0.05,
    "rho_schedule": "constant",
    "rho_min": 0.0,
    "total_steps": None,
    "seed": 0,
    "replay_rng": True,
}
"""Keywords every method accepts (``rho`` is ignored by methods that do not perturb)."""


@dataclass(frozen=True)
class MethodInfo:
    """A registered method.

    Attributes:
        name: the registry name (``create_optimizer(model, name)``).
        build: ``build(**method_kwargs) -> list[Rule]``.
        defaults: the method-specific keywords and their defaults (merged over :data:`COMMON_KEYWORDS`).
        needs_lora: the method acts on LoRA factors and refuses models without LoRA layers.
        summary: one line for ``flatpeft methods`` and docs.
        reference: the paper / spec section.
    """

    name: str
    build: Callable[..., list[Rule]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_lora: bool = False
    summary: str = ""
    reference: str = ""

    def all_defaults(self) -> dict[str, Any]:
        return {**COMMON_KEYWORDS, **self.defaults}


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    """Register a method; names are unique."""
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


_BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def _resolve_base(base_optimizer: Any) -> type[torch.optim.Optimizer]:
    if isinstance(base_optimizer, str):
        key = base_optimizer.lower()
        if key not in _BASE_OPTIMIZERS:
            raise ValueError(f"Invalid base_optimizer: {base_optimizer!r}; valid: {', '.join(_BASE_OPTIMIZERS)} or an Optimizer class")
        return _BASE_OPTIMIZERS[key]
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return base_optimizer
    raise ValueError(f"Invalid base_optimizer: {base_optimizer!r}; expected 'sgd', 'adam', 'adamw' or a torch.optim.Optimizer class")


def _base_keywords(cls: type[torch.optim.Optimizer]) -> set[str] | None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None  # accepts anything
    return {n for n in params if n not in ("self", "params")}


def validate_common(kw: Mapping[str, Any]) -> None:
    """Range checks shared by all methods (``ValueError`` naming argument and value)."""
    optional(non_negative, "rho", kw.get("rho"))
    one_of("rho_schedule", kw.get("rho_schedule"), SCHEDULES)
    optional(non_negative, "rho_min", kw.get("rho_min"))
    total = kw.get("total_steps")
    if total is not None and not (isinstance(total, int) and not isinstance(total, bool) and total > 0):
        raise ValueError(f"Invalid total_steps: {total!r} (must be a positive integer or None)")


def _check_groups(params: Any, named: list) -> list:
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    known = {id(p) for _, p in named}
    for i, g in enumerate(groups):
        g["params"] = list(g["params"])
        for p in g["params"]:
            if id(p) not in known:
                raise ValueError(f"params: group {i} holds a tensor that is not a trainable parameter of the model")
    return groups


def create_optimizer(
    model: nn.Module,
    method: str,
    base_optimizer: Any = "adamw",
    *,
    params: Any = None,
    **kwargs: Any,
) -> SharpnessAware:
    """Build the flatpeft optimizer of ``method`` over ``model``'s trainable tensors.

    Args:
        model: any ``nn.Module``; the trainable set is the parameters with ``requires_grad`` (never changed).
        method: a name of :data:`flatpeft.METHODS`.
        base_optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or a ``torch.optim.Optimizer`` class.
        params: optional parameter groups (or tensors) for the base optimizer, e.g. to exempt biases and norms
            from weight decay; every tensor must be a trainable parameter of ``model``. Default: all trainable
            parameters in one group.
        **kwargs: method keywords (see each method's docstring: ``rho``, ``fraction``, ``beta``, ...) and base
            optimizer keywords (``lr``, ``weight_decay``, ``momentum``, ...). A keyword that neither accepts
            raises ``ValueError`` naming it.

    Example::

        opt = flatpeft.create_optimizer(model, "flatpo", base_optimizer=torch.optim.AdamW, lr=1e-4, rho=0.05, fraction=0.05)
        opt.zero_grad()
        loss = opt.step(closure)
    """
    info = get_method(method)
    base_cls = _resolve_base(base_optimizer)
    defaults = info.all_defaults()
    method_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in defaults}
    allowed = _base_keywords(base_cls)
    if allowed is not None:
        unknown = sorted(k for k in kwargs if k not in allowed)
        if unknown:
            raise ValueError(
                f"Unknown keyword argument(s) {', '.join(map(repr, unknown))} for method {method!r} with base optimizer "
                f"{base_cls.__name__}; method keywords: {', '.join(sorted(defaults))}; base optimizer keywords: "
                f"{', '.join(sorted(allowed))}"
            )
    cfg = {**defaults, **method_kw}
    validate_common(cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"model has no trainable parameters (requires_grad=True): nothing for method {method!r} to train")
    if info.needs_lora:
        lora = require_lora_layers(model, method)
    else:
        lora, _ = find_lora_layers(model)
    rule_kw = {k: v for k, v in cfg.items() if k not in COMMON_KEYWORDS}
    rules = info.build(**rule_kw)
    groups = [p for _, p in named] if params is None else _check_groups(params, named)
    base = base_cls(groups, **kwargs)
    name_of = {id(p): n for n, p in named}
    return SharpnessAware(
        base,
        rules,
        names=[name_of[id(p)] for g in base.param_groups for p in g["params"]],
        lora=lora,
        rho=cfg["rho"],
        rho_schedule=cfg["rho_schedule"],
        rho_min=cfg["rho_min"],
        total_steps=cfg["total_steps"],
        seed=cfg["seed"],
        replay_rng=cfg["replay_rng"],
        method=method,
    )
