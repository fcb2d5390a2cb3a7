"""Method registry and the ``create_optimizer`` factory.

A method is registered once with a :class:`MethodInfo`: its name, a ``build(**kwargs)`` that returns its rules
(whose keyword arguments are the method's keywords and defaults), its values of the common keywords, whether it
needs LoRA layers, and where each default comes from. ``create_optimizer`` splits the user's keywords between the method and the base optimizer and rejects
anything neither accepts, naming it.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flatpeft._checks import check_like_default, is_int, non_negative, one_of, optional, positive_int, short_repr
from flatpeft.adapters.lora import adapter_parameters, find_lora_layers, require_lora_layers
from flatpeft.optim.sharpness_aware import SharpnessAware
from flatpeft.perturb.rules import Rule
from flatpeft.perturb.schedules import SCHEDULES

__all__ = ["MethodInfo", "register_method", "get_method", "create_optimizer", "method_names", "methods_table", "unregister_method", "COMMON_KEYWORDS"]

COMMON_KEYWORDS: dict[str, Any] = {
    "rho": 0.05,
    "rho_schedule": "constant",
    "rho_min": 0.0,
    "total_steps": None,
    "seed": 0,
    "replay_rng": True,
    "pass2_norm_stats": False,
}
"""Keywords every method accepts (``rho`` is ignored by methods that do not perturb). ``rho_min`` is the final
radius of a decaying ``rho_schedule`` (None: a method-specific fraction of ``rho``); ``pass2_norm_stats`` lets
pass 2 of a two-pass step update BatchNorm running statistics (default: only pass 1 does)."""


def _signature_defaults(build: Callable[..., Any]) -> dict[str, Any]:
    params = inspect.signature(build).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class MethodInfo:
    """A registered method.

    The method's own keywords and their defaults are the keyword arguments of ``build`` (one source of truth);
    ``defaults`` holds only the method's values for the common keywords (:data:`COMMON_KEYWORDS`: ``rho``,
    ``rho_schedule``, ...). ``passes`` is derived from the rules ``build()`` returns.

    Attributes:
        name: the registry name (``create_optimizer(model, name)``).
        build: ``build(**method_kwargs) -> list[Rule]``.
        defaults: the method's defaults of common keywords, e.g. ``{"rho": 0.5}``.
        needs_lora: the method acts on LoRA factors and refuses models without LoRA layers.
        summary: one line for ``flatpeft methods`` and docs.
        reference: the paper.
        sources: where each default comes from (keyword -> source), for docs and ``flatpeft methods``.
        perturbs: what the method perturbs; ranks: what it ranks (FlatPO); memory: what extra memory it holds.
        rho_min_fraction: ``rho_min=None`` means ``rho_min_fraction * rho`` (the final radius of a decaying
            schedule, relative to ``rho``).
        schedule: the method's own schedule over training, if any (e.g. "cosine rho decay"); it runs over
            ``total_steps``, and ``create_optimizer`` warns when ``total_steps`` is not given.
    """

    name: str
    build: Callable[..., list[Rule]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_lora: bool = False
    summary: str = ""
    reference: str = ""
    sources: Mapping[str, str] = field(default_factory=dict)
    perturbs: str = "-"
    ranks: str = "-"
    memory: str = "-"
    rho_min_fraction: float = 0.0
    schedule: str = ""

    def __post_init__(self) -> None:
        own = _signature_defaults(self.build)
        for key, value in self.defaults.items():
            if key in own and own[key] != value:
                raise ValueError(
                    f"method {self.name!r}: default of {key!r} given twice ({own[key]!r} in build(), {value!r} in "
                    "MethodInfo.defaults); keep it in build()'s signature only"
                )
            if key not in own and key not in COMMON_KEYWORDS:
                raise ValueError(f"method {self.name!r}: defaults has {key!r}, which is neither a keyword of build() nor common")

    def method_defaults(self) -> dict[str, Any]:
        """The method's own keywords (from ``build``'s signature) and its values of common keywords."""
        return {**_signature_defaults(self.build), **self.defaults}

    def all_defaults(self) -> dict[str, Any]:
        """Every keyword the method accepts, with its default."""
        return {**COMMON_KEYWORDS, **self.method_defaults()}

    @property
    def passes(self) -> int:
        """Forward+backward passes per step with the default keywords (1 or 2)."""
        return max([r.passes for r in self.build()], default=1)


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    """Register a method (names are unique). It is then usable by name in :func:`create_optimizer`, the Trainer,
    the CLI config's ``method.name`` and ``flatpeft methods``."""
    if not isinstance(info, MethodInfo):
        raise ValueError(f"register_method expects a MethodInfo, got {type(info).__name__}")
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


#: names of flatpeft's own methods (:func:`mark_builtin`, called once the built-in methods are registered)
_BUILTIN: set[str] = set()


def mark_builtin() -> None:
    """Record every method registered so far as built in (:mod:`flatpeft.methods` calls it after registering)."""
    _BUILTIN.update(_REGISTRY)


def unregister_method(name: str) -> MethodInfo:
    """Remove a method added with :func:`register_method` (built-in methods cannot be removed); returns its info."""
    if get_method(name).name in _BUILTIN:
        raise ValueError(f"method {name!r} is built in and cannot be unregistered")
    return _REGISTRY.pop(get_method(name).name)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order (built-in ones first)."""
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


def describe_optimizer(obj: Any) -> str:
    """A short name for a base optimizer given in any accepted form (never its repr, which lists every tensor)."""
    if isinstance(obj, str):
        return repr(obj)
    if isinstance(obj, functools.partial):
        return f"functools.partial({describe_optimizer(obj.func)}, ...)"
    if isinstance(obj, type):
        return obj.__name__
    if isinstance(obj, torch.optim.Optimizer):
        return f"an instance of {type(obj).__name__}"
    return getattr(obj, "__qualname__", None) or f"an object of type {type(obj).__name__}"


def _resolve_base(base_optimizer: Any) -> Any:
    """``base_optimizer`` as an optimizer instance (wrapped as is) or a factory ``factory(groups, **kwargs)``."""
    if isinstance(base_optimizer, str):
        key = base_optimizer.lower()
        if key not in _BASE_OPTIMIZERS:
            raise ValueError(f"Invalid base_optimizer: {base_optimizer!r}; valid: {', '.join(_BASE_OPTIMIZERS)}, an Optimizer class, instance or factory")
        return _BASE_OPTIMIZERS[key]
    if isinstance(base_optimizer, SharpnessAware):
        raise ValueError(
            f"Invalid base_optimizer: {describe_optimizer(base_optimizer)}, already a flatpeft optimizer (method "
            f"{base_optimizer.method!r}); pass the optimizer it wraps (.base_optimizer) to build another method"
        )
    if isinstance(base_optimizer, torch.optim.Optimizer) or callable(base_optimizer):
        return base_optimizer
    raise ValueError(
        f"Invalid base_optimizer: {describe_optimizer(base_optimizer)}; expected 'sgd', 'adam', 'adamw', a "
        "torch.optim.Optimizer class, an optimizer instance (wrapped as is) or a callable such as "
        "functools.partial(torch.optim.AdamW, betas=(0.9, 0.95)) that builds one from parameter groups"
    )


def _base_keywords(factory: Any) -> set[str] | None:
    """The keywords ``factory(params, **kwargs)`` accepts; None when it accepts any (or its signature is unknown)."""
    try:
        target = factory.__init__ if isinstance(factory, type) else factory
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None  # accepts anything
    return {n for n in params if n not in ("self", "params")}


def _check_base_keywords(base: Any, kwargs: Mapping[str, Any], method: str, method_keywords: Iterable[str]) -> None:
    """``ValueError`` naming every keyword that neither the method nor the base optimizer accepts (an optimizer
    instance, wrapped as is, accepts none)."""
    if isinstance(base, torch.optim.Optimizer):
        if kwargs:
            raise ValueError(
                f"base_optimizer is {describe_optimizer(base)}, wrapped as is (its parameter groups, learning rates and "
                f"state); base optimizer keyword(s) {', '.join(map(repr, sorted(kwargs)))} cannot apply to it. Set them "
                f"on the instance, or pass its class or a factory instead (method {method!r})"
            )
        return
    allowed = _base_keywords(base)
    if allowed is None:
        return
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise ValueError(
            f"Unknown keyword argument(s) {', '.join(map(repr, unknown))} for method {method!r} with base optimizer "
            f"{describe_optimizer(base)}; method keywords: {', '.join(sorted(method_keywords))}; base optimizer "
            f"keywords: {', '.join(sorted(allowed))}"
        )


def _build_base(base: Any, groups: list, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer: ``base`` itself when it is an instance, else ``base(groups, **kwargs)`` (checked)."""
    if isinstance(base, torch.optim.Optimizer):
        return base
    built = base(groups, **kwargs)
    if not isinstance(built, torch.optim.Optimizer) or isinstance(built, SharpnessAware):
        raise ValueError(
            f"base_optimizer {describe_optimizer(base)} returned {describe_optimizer(built)}, not a plain "
            "torch.optim.Optimizer"
        )
    return built


def _instance_groups(base: torch.optim.Optimizer, named: list) -> None:
    """Check that every tensor of an optimizer instance is a trainable tensor of the model."""
    known = {id(p) for _, p in named}
    for i, g in enumerate(base.param_groups):
        for j, p in enumerate(g["params"]):
            if id(p) not in known:
                raise ValueError(
                    f"base_optimizer ({describe_optimizer(base)}): param_groups[{i}]['params'][{j}] (shape "
                    f"{tuple(p.shape)}) is not a trainable parameter of the model (requires_grad=True)"
                )


def validate_common(kw: Mapping[str, Any]) -> None:
    """Range checks shared by all methods (``ValueError`` naming argument and value)."""
    optional(non_negative, "rho", kw.get("rho"))
    one_of("rho_schedule", kw.get("rho_schedule"), SCHEDULES)
    optional(non_negative, "rho_min", kw.get("rho_min"))
    rho, rho_min = kw.get("rho"), kw.get("rho_min")
    if kw.get("rho_schedule") != "constant" and rho is not None and rho_min is not None and rho_min > rho:
        raise ValueError(
            f"Invalid rho_min: {rho_min!r} is larger than rho={rho!r}: a decaying rho_schedule would grow the radius; "
            "give rho_min <= rho (or rho_min=None for the method's default fraction of rho)"
        )
    optional(positive_int, "total_steps", kw.get("total_steps"))
    if "seed" in kw and not is_int(kw["seed"]):
        raise ValueError(f"Invalid seed: {short_repr(kw['seed'])} (must be an integer)")


def _check_base_keyword_types(base: Any, kwargs: Mapping[str, Any]) -> None:
    """Refuse (naming it) a keyword of a ``torch.optim`` optimizer class whose value does not fit its default's type
    (``betas=[0.9]``, ``weight_decay='abc'``), before torch fails with a message that names no keyword."""
    cls = base.func if isinstance(base, functools.partial) else base
    if not isinstance(cls, type) or not cls.__module__.startswith("torch.optim"):
        return
    params = inspect.signature(cls.__init__).parameters
    for key, value in kwargs.items():
        if key in params and params[key].default is not inspect.Parameter.empty:
            check_like_default(key, value, params[key].default, allow_none=False)


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


def _trainable(model_or_params: Any) -> tuple[nn.Module | None, list[tuple[str, torch.Tensor]], Any]:
    """``(module or None, [(name, tensor)] trainable, user groups or None)`` from a model or an iterable."""
    if isinstance(model_or_params, nn.Module):
        return model_or_params, [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad], None
    if isinstance(model_or_params, torch.Tensor) or not isinstance(model_or_params, Iterable):
        raise ValueError(
            f"create_optimizer expects an nn.Module or an iterable of parameters / parameter groups, got "
            f"{type(model_or_params).__name__}"
        )
    groups = list(model_or_params)
    if groups and isinstance(groups[0], dict):
        tensors = [p for g in groups for p in g["params"]]
    else:
        tensors, groups = groups, None
    seen: set[int] = set()
    named = []
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"params: item {i} is a {type(p).__name__}, not a tensor")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((f"param{i}", p))
    return None, named, groups


def _norm_modules(model: nn.Module | None) -> list[nn.Module]:
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def create_optimizer(
    model: nn.Module | Iterable[Any],
    method: str,
    base_optimizer: Any = "adamw",
    *,
    params: Any = None,
    **kwargs: Any,
) -> SharpnessAware:
    """Build the flatpeft optimizer of ``method`` over ``model``'s trainable tensors.

    Args:
        model: an ``nn.Module`` (the trainable set is its parameters with ``requires_grad``, never changed), or,
            like ``torch.optim``, an iterable of tensors or parameter groups. With plain tensors flatpeft cannot
            see LoRA layers, BatchNorm modules or which tensors are PEFT adapters: LoRA-only methods then refuse
            with a message, and FlatPO/SPIDER treat every tensor alike.
        method: a registered method name (:func:`method_names`; built-in: :data:`flatpeft.METHODS`).
        base_optimizer: what the update step runs, in any of these forms:

            * ``"sgd"``, ``"adam"``, ``"adamw"`` or a ``torch.optim.Optimizer`` class, built as
              ``cls(groups, **base keywords)``;
            * a callable that builds one from parameter groups, e.g. ``functools.partial(torch.optim.AdamW,
              betas=(0.9, 0.95))`` (called the same way);
            * an optimizer *instance*, wrapped as it is: its parameter groups (e.g. LoRA+'s groups with their own
              learning rates), their hyper-parameters and its state are kept; no base keywords or ``params`` may
              be given then, and each of its tensors must be a trainable parameter of ``model``.
        params: optional parameter groups (or tensors) for the base optimizer when ``model`` is a module, e.g. to
            exempt biases and norms from weight decay; every tensor must be a trainable parameter of ``model``.
        **kwargs: method keywords (see ``flatpeft methods`` and docs/methods.md: ``rho``, ``fraction``, ``beta``,
            ...) and base optimizer keywords (``lr``, ``weight_decay``, ``momentum``, ...). A keyword that neither
            accepts raises ``ValueError`` naming it.

    Example::

        opt = flatpeft.create_optimizer(model, "flatpo", base_optimizer=torch.optim.AdamW, lr=1e-4, rho=0.05, fraction=0.05)
        opt.zero_grad()
        loss = opt.step(closure)
    """
    info = get_method(method)
    base = _resolve_base(base_optimizer)
    defaults = info.all_defaults()
    method_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in defaults}
    _check_base_keywords(base, kwargs, method, defaults)
    _check_base_keyword_types(base, kwargs)
    for key, value in method_kw.items():
        check_like_default(key, value, defaults[key])
    if params is not None and isinstance(base, torch.optim.Optimizer):
        raise ValueError(f"params: base_optimizer is {describe_optimizer(base)}, whose parameter groups are used as they are")
    cfg = {**defaults, **method_kw}
    if cfg["rho_min"] is None:
        cfg["rho_min"] = info.rho_min_fraction * cfg["rho"] if isinstance(cfg["rho"], (int, float)) else None
    validate_common(cfg)
    module, named, user_groups = _trainable(model)
    if not named:
        raise ValueError(f"model has no trainable parameters (requires_grad=True): nothing for method {method!r} to train")
    if module is None:
        if info.needs_lora:
            raise ValueError(
                f"method={method!r} needs the model (an nn.Module with LoRA layers) to find its LoRA factors; "
                "create_optimizer got plain tensors. Pass the model (and params=... for custom groups)."
            )
        lora, adapter_ids = [], set()
    else:
        lora = require_lora_layers(module, method) if info.needs_lora else find_lora_layers(module)[0]
        adapter_ids = adapter_parameters(module)
    if cfg["total_steps"] is None and (info.schedule or cfg["rho_schedule"] != "constant"):
        what = info.schedule or f"rho_schedule={cfg['rho_schedule']!r}"
        warnings.warn(
            f"method {method!r}: {what} needs total_steps (the number of optimizer steps); without it the schedule "
            "stays at its starting value. Pass total_steps=... (SharpnessAwareTrainer and the CLI set it).",
            stacklevel=2,
        )
    rule_kw = {k: v for k, v in cfg.items() if k not in COMMON_KEYWORDS}
    rules = info.build(**rule_kw)
    if isinstance(base, torch.optim.Optimizer):
        _instance_groups(base, named)
        groups = []
    elif module is None:
        groups = user_groups if user_groups is not None else [p for _, p in named]
    else:
        groups = [p for _, p in named] if params is None else _check_groups(params, named)
    base = _build_base(base, groups, kwargs)
    name_of = {id(p): n for n, p in named}
    flat = [p for g in base.param_groups for p in g["params"]]
    return SharpnessAware(
        base,
        rules,
        names=[name_of.get(id(p), f"param{i}") for i, p in enumerate(flat)],
        lora=lora,
        adapters=[id(p) in adapter_ids for p in flat],
        norm_modules=_norm_modules(module),
        rho=cfg["rho"],
        rho_schedule=cfg["rho_schedule"],
        rho_min=cfg["rho_min"],
        total_steps=cfg["total_steps"],
        seed=cfg["seed"],
        rank=_rank(),
        replay_rng=cfg["replay_rng"],
        pass2_norm_stats=cfg["pass2_norm_stats"],
        method=method,
    )


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def methods_table(names: Iterable[str] | None = None) -> str:
    """A Markdown table of the registered methods: passes, default keywords with their sources, what is perturbed,
    what is ranked, and the extra memory held (docs/methods.md embeds the built-in rows; a test keeps it true)."""
    rows = [
        "| method | passes | defaults (source) | perturbs | ranks | extra memory |",
        "|---|---|---|---|---|---|",
    ]
    for name in names if names is not None else method_names():
        info = get_method(name)
        kws = []
        for key, value in info.method_defaults().items():
            if key == "rho_min" and value is None:
                value = f"{info.rho_min_fraction:g} x rho"
            source = info.sources.get(key)
            kws.append(f"`{key}`={_fmt(value)}" + (f" ({source})" if source else ""))
        rows.append(
            f"| `{name}` | {info.passes} | {'; '.join(kws) or '-'} | {info.perturbs} | {info.ranks} | {info.memory} |"
        )
    return "\n".join(rows)
