"""LLaMA-Factory with a flatpeft method: keep your LLaMA-Factory YAML, add ``flatpeft_*`` keys, run one command.

::

    python -m flatpeft.integrations.llamafactory train my_sft.yaml [key=value ...]

``my_sft.yaml`` is a LLaMA-Factory training config (what ``llamafactory-cli train my_sft.yaml`` takes) with these
keys added:

* ``flatpeft_method`` (required): a flatpeft method, e.g. ``flatpo``, ``eflat-lora``, ``sam``;
* ``flatpeft_<keyword>``: one method keyword each, e.g. ``flatpeft_rho: 0.05``, ``flatpeft_fraction: 0.05``
  (or all of them as a mapping under ``flatpeft_kwargs``);
* ``flatpeft_sync_ascent_grad`` (optional, DDP): all-reduce the pass-1 gradient.

Trailing ``key=value`` arguments override keys of the file (values are read as YAML), as with
``llamafactory-cli``.

What it does (LLaMA-Factory 0.9.5 has no optimizer or trainer plug-in, so these are its module-level names):

1. strips the ``flatpeft_*`` keys (LLaMA-Factory's argument parser refuses unknown keys) and checks them;
2. for the run, replaces the stage's trainer class where its workflow looks it up (``sft``:
   ``CustomSeq2SeqTrainer``, ``pt``: ``CustomTrainer``, ``dpo``: ``CustomDPOTrainer``, ``rm``:
   ``PairwiseTrainer``, ``kto``: ``CustomKTOTrainer``) by ``SharpnessAwareMixin`` + that class. The mixin wraps
   the optimizer LLaMA-Factory builds (``create_custom_optimizer``: LoRA+ ``loraplus_lr_ratio``, GaLore, APOLLO,
   BAdam, Adam-mini, Muon, or the Trainer's own), so its parameter groups and learning rates are kept; the
   metrics trl's DPO and KTO trainers record inside ``compute_loss`` (``_stored_metrics``) are kept from pass 1
   only, like trl's other stores;
3. replaces LLaMA-Factory's ``LogCallback`` by a subclass that also writes ``flatpeft/loss_gap`` and
   ``flatpeft/perturbation_norm`` into ``trainer_log.jsonl``, and with ``plot_loss: true`` plots them next to
   the loss (``training_flatpeft_loss_gap.png``, ``training_flatpeft_perturbation_norm.png``);
4. calls LLaMA-Factory's ``run_exp`` with the remaining config, then puts every replaced name back.

The ``ppo`` stage is refused with a message (trl's PPO trainer runs its own generation loop, not
``Trainer.training_step``). DeepSpeed configs are refused by the mixin (use FSDP2).
Several processes: ``torchrun --nproc_per_node N -m flatpeft.integrations.llamafactory train my_sft.yaml``.
See ``docs/frameworks.md``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import flatpeft
from flatpeft.integrations.trainer import SharpnessAwareMixin

__all__ = [
    "FlatpeftSettings", "STAGES", "load_config", "main", "parse_overrides", "prepare", "sharpness_aware_class", "split_config",
    "train",
]

PREFIX = "flatpeft_"

#: LLaMA-Factory stage -> (its workflow module, the module where the workflow looks its trainer class up when it
#: runs, the class name)
STAGES: dict[str, tuple[str, str, str]] = {
    "sft": ("llamafactory.train.sft.workflow", "llamafactory.train.sft.workflow", "CustomSeq2SeqTrainer"),
    "pt": ("llamafactory.train.pt.workflow", "llamafactory.train.pt.workflow", "CustomTrainer"),
    "dpo": ("llamafactory.train.dpo.workflow", "llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
    "rm": ("llamafactory.train.rm.workflow", "llamafactory.train.rm.workflow", "PairwiseTrainer"),
    "kto": ("llamafactory.train.kto.workflow", "llamafactory.train.kto.workflow", "CustomKTOTrainer"),
}

#: where LLaMA-Factory's trainers record metrics inside compute_loss (trl's store_metrics: DPO rewards, log-probs);
#: kept from pass 1 only, like trl's own stores (SharpnessAwareMixin.flatpeft_metric_attributes)
METRIC_ATTRIBUTES = SharpnessAwareMixin.flatpeft_metric_attributes + ("_stored_metrics",)

#: the flatpeft metrics added to LLaMA-Factory's trainer_log.jsonl and loss plots
METRICS = ("flatpeft/loss_gap", "flatpeft/perturbation_norm")


@dataclass
class FlatpeftSettings:
    """The flatpeft part of a LLaMA-Factory config: the method, its keywords and ``sync_ascent_grad``."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    sync_ascent_grad: bool = False


def split_config(config: Mapping[str, Any], source: str = "config") -> tuple[dict[str, Any], FlatpeftSettings]:
    """``(LLaMA-Factory's config without the flatpeft keys, the flatpeft settings)``.

    ``ValueError`` naming ``source`` and the key for a missing or unknown ``flatpeft_method``, a
    ``flatpeft_kwargs`` that is not a mapping, or a keyword given twice.
    """
    rest = {k: v for k, v in config.items() if not str(k).startswith(PREFIX)}
    ours = {str(k)[len(PREFIX):]: v for k, v in config.items() if str(k).startswith(PREFIX)}
    method = ours.pop("method", None)
    if not isinstance(method, str):
        raise ValueError(
            f"{source}: flatpeft_method is required (a method name such as flatpo, eflat-lora, sam); registered "
            f"methods: {', '.join(flatpeft.optim.method_names())}"
        )
    try:
        flatpeft.get_method(method)
    except ValueError as err:
        raise ValueError(f"{source}: flatpeft_method: {err}") from None
    kwargs = ours.pop("kwargs", None) or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: flatpeft_kwargs must be a mapping of method keywords, got {type(kwargs).__name__}")
    sync = ours.pop("sync_ascent_grad", False)
    if not isinstance(sync, bool):
        raise ValueError(f"{source}: flatpeft_sync_ascent_grad must be true or false, got {sync!r}")
    twice = sorted(set(kwargs) & set(ours))
    if twice:
        raise ValueError(f"{source}: {', '.join(PREFIX + k for k in twice)} given both as a key and in flatpeft_kwargs")
    known = flatpeft.get_method(method).all_defaults()
    unknown = sorted(k for k in ours if k not in known)
    if unknown:
        raise ValueError(
            f"{source}: {', '.join(PREFIX + k for k in unknown)} is not a keyword of method {method!r}; its keywords: "
            f"{', '.join(PREFIX + k for k in sorted(known))} (base-optimizer settings go in flatpeft_kwargs)"
        )
    return rest, FlatpeftSettings(method=method, kwargs={**kwargs, **ours}, sync_ascent_grad=sync)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML mapping in ``path`` (``yaml.safe_load``), with ``key=value`` overrides (values read as YAML)."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of LLaMA-Factory keys, got {type(config).__name__}")
    return {**config, **parse_overrides(overrides)}


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``key=value`` command-line overrides as a mapping (values read as YAML, like ``llamafactory-cli``)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def prepare(config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], FlatpeftSettings]:
    """``(LLaMA-Factory's arguments, flatpeft settings)`` from a YAML path or a mapping plus overrides; checks the
    flatpeft keys and the stage (``ValueError`` naming the file and key)."""
    if isinstance(config, (str, Path)):
        source, raw = str(config), load_config(config, overrides)
    else:
        source, raw = "config", {**config, **parse_overrides(overrides)}
    lf_args, settings = split_config(raw, source)
    stage = lf_args.get("stage", "sft")
    if stage not in STAGES:
        raise ValueError(
            f"{source}: stage: {stage!r} is not supported with flatpeft; supported LLaMA-Factory stages: "
            f"{', '.join(STAGES)} (docs/frameworks.md)"
        )
    return lf_args, settings


def sharpness_aware_class(base: type, settings: FlatpeftSettings, built: list | None = None) -> type:
    """``SharpnessAwareMixin`` + ``base`` (a LLaMA-Factory trainer class) built with ``settings``; every instance is
    appended to ``built`` when given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        SharpnessAwareMixin.__init__(self, *args, flatpeft_method=settings.method, flatpeft_kwargs=dict(settings.kwargs),
                                     sync_ascent_grad=settings.sync_ascent_grad, **kwargs)
        if built is not None:
            built.append(self)

    namespace = {"__init__": __init__, "flatpeft_metric_attributes": METRIC_ATTRIBUTES}
    return type(f"SharpnessAware{base.__name__}", (SharpnessAwareMixin, base), namespace)


def _require_llamafactory() -> None:
    """``ImportError`` naming the extra when LLaMA-Factory is not installed."""
    if importlib.util.find_spec("llamafactory") is None:
        raise ImportError(
            "flatpeft.integrations.llamafactory needs LLaMA-Factory, which is not installed; install the extra: "
            "pip install 'flatpeft[llamafactory]' (docs/frameworks.md gives a CPU set-up)"
        )


def _log_callback_class() -> type:
    """LLaMA-Factory's ``LogCallback`` that also writes flatpeft's metrics into ``trainer_log.jsonl``."""
    from llamafactory.train.callbacks import LogCallback

    class FlatpeftLogCallback(LogCallback):
        """``LogCallback`` whose ``trainer_log.jsonl`` lines also hold the flatpeft metrics of the same log.

        ``LogCallback.on_log`` writes the line later, on its writer thread (one worker, in order), so the metrics of
        each log it will write are queued here in the same order and merged in ``_write_log``.
        """

        def __init__(self) -> None:
            super().__init__()
            self._flatpeft_pending: collections.deque[dict[str, float]] = collections.deque()

        def on_log(self, args, state, control, **kwargs):
            if args.should_save and self.thread_pool is not None:  # LogCallback writes a line for this log
                last = state.log_history[-1] if state.log_history else {}
                self._flatpeft_pending.append({k: last[k] for k in METRICS if k in last})
            return super().on_log(args, state, control, **kwargs)

        def _write_log(self, output_dir: str, logs: dict[str, Any]) -> None:
            extra = self._flatpeft_pending.popleft() if self._flatpeft_pending else {}
            super()._write_log(output_dir, {**logs, **extra})

    return FlatpeftLogCallback


def _plot_with_metrics(plot_loss: Any) -> Any:
    """LLaMA-Factory's ``plot_loss`` that also plots the flatpeft metrics."""

    def plot(save_dictionary: str, keys: list[str] = ["loss"]) -> None:  # noqa: B006 (LLaMA-Factory's signature)
        plot_loss(save_dictionary, keys=list(keys) + [k for k in METRICS if k not in keys])

    return plot


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    """``module.name = value`` inside the block; the original is put back afterwards, also on error."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def train(config: Mapping[str, Any] | str | Path, overrides: Sequence[str] = (), callbacks: list | None = None) -> list:
    """Run LLaMA-Factory's ``run_exp`` on ``config`` (a path to a YAML file, or a mapping) with the flatpeft method.

    Returns the flatpeft trainers built during the run, e.g. to read ``trainer.flatpeft_optimizer``. ``callbacks``
    are passed to ``run_exp``.
    """
    lf_args, settings = prepare(config, overrides)
    _require_llamafactory()
    workflow_name, trainer_module_name, trainer_name = STAGES[lf_args.get("stage", "sft")]
    workflow = importlib.import_module(workflow_name)
    trainer_module = importlib.import_module(trainer_module_name)
    tuner = importlib.import_module("llamafactory.train.tuner")
    built: list = []
    trainer_cls = sharpness_aware_class(getattr(trainer_module, trainer_name), settings, built)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(trainer_module, trainer_name, trainer_cls))
        stack.enter_context(_replaced(tuner, "LogCallback", _log_callback_class()))
        stack.enter_context(_replaced(workflow, "plot_loss", _plot_with_metrics(workflow.plot_loss)))
        tuner.run_exp(args=lf_args, callbacks=list(callbacks or []))
    return built


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flatpeft.integrations.llamafactory train CONFIG.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flatpeft.integrations.llamafactory",
        description="Run a LLaMA-Factory training config (plus flatpeft_* keys) with a flatpeft method.",
    )
    parser.add_argument("command", choices=["train"], help="what llamafactory-cli would do (train only)")
    parser.add_argument("config", type=Path, help="LLaMA-Factory YAML with flatpeft_method and flatpeft_<keyword> keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    ns = parser.parse_args(argv)
    if not ns.config.is_file():
        parser.error(f"config file not found: {ns.config}")
    try:
        prepare(ns.config, ns.overrides)  # the flatpeft keys and the stage, before LLaMA-Factory starts
        _require_llamafactory()
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train(ns.config, ns.overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
