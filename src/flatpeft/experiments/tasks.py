"""Task base class and registry.

A task turns an :class:`~flatpeft.experiments.config.ExperimentConfig` into a model (peft applied),
seed-fixed training batches, a loss and an evaluation. The runner (:mod:`flatpeft.experiments.runner`)
drives any task the same way, so a new setting is one subclass and one ``@register_task`` line::

    @register_task("my_task")
    class MyTask(Task):
        args_cls = MyArgs                    # dataclass for cfg.task_args (unknown keys rejected)
        def __init__(self, cfg, seed): ...    # build self.model and the data, deterministic in seed
        def train_batches(self): ...          # infinite iterator, order fixed by the seed
        def loss(self, model, batch): ...     # scalar tensor
        def evaluate(self, model, split="test"): ...   # dict with at least "accuracy"

Contract (``docs/architecture.md`` section 3):

* ``Task(cfg, seed)`` builds ``self.model`` and the data; the same ``(cfg, seed)`` gives the same
  initialisation and examples. The runner seeds the global RNGs before and again after construction,
  so every method of one seed sees the same dropout stream.
* ``train_batches()`` must not consume the global RNG for its order (use a ``torch.Generator``).
* ``save(out_dir)`` writes the adapter in peft format (``save_pretrained``); ``Task.load(run_dir, cfg)``
  rebuilds the task and loads those weights.

Lookup: :func:`get_task` imports :mod:`flatpeft.multimodal` lazily when a name is not registered yet
(the multimodal tasks register themselves on import), then fails with the list of valid names.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from flatpeft._checks import short_repr

from .config import ExperimentConfig, parse_dataclass

__all__ = ["Task", "Metric", "NoArgs", "register_task", "get_task", "available_tasks", "TASKS", "LAZY_TASK_MODULES",
           "resolve_device", "check_module_names", "TRAIN_DEVICE_TYPES"]

#: name -> Task subclass
TASKS: dict[str, type["Task"]] = {}

#: Modules imported (once, lazily) when a task name is not registered yet.
LAZY_TASK_MODULES: list[str] = ["flatpeft.experiments.text_classification", "flatpeft.multimodal"]


@dataclasses.dataclass(frozen=True)
class Metric:
    """What a task's metric means, declared by the task (the results page formats and compares by it).

    ``percent``: a fraction shown in % (differences in percentage points); ``before``: the metric of the model
    before fine-tuning that this one is retained against (the page shows ``value / before``); ``higher_is_better``:
    the direction of "better" (a perplexity is not)."""

    percent: bool = True
    before: str | None = None
    higher_is_better: bool = True


@dataclasses.dataclass
class NoArgs:
    """Tasks without task-specific options (``task_args`` must be empty)."""


#: Device types a run may ask for in ``train.device`` (``meta`` holds no data, so nothing could be trained on it).
TRAIN_DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else -> ``torch.device(name)``, refused (naming
    ``train.device``) when it is not one flatpeft trains on (cpu, cuda, cuda:N, mps) or not available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"train.device: invalid device {short_repr(name)}: {str(err)[:200]}") from None
    if device.type not in TRAIN_DEVICE_TYPES:
        raise ValueError(f"train.device: {short_repr(name)} is not a device flatpeft trains on (valid: auto, "
                         f"{', '.join(TRAIN_DEVICE_TYPES)}, cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device: {short_repr(name)} asked for, but torch finds no CUDA GPU on this machine "
                             "(torch.cuda.is_available() is False); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train.device: {short_repr(name)} asked for, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"train.device: {short_repr(name)} asked for, but MPS is not available on this machine; use auto or cpu")
    return device


def check_module_names(model: torch.nn.Module, names: list[str], key: str, model_name: str) -> None:
    """Refuse (naming ``key``) module names that match no module of ``model`` the way peft matches
    ``modules_to_save`` (a module whose dotted name ends with the given name); peft would ignore them silently."""
    modules = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    missing = [name for name in names if not any(n.endswith(name) for n in modules)]
    if missing:
        tops = sorted({last for last in (n.split(".")[-1] for n in modules) if not last.isdigit()})
        shown = ", ".join(tops[:12]) + (", ..." if len(tops) > 12 else "")
        raise ValueError(f"{key}: no module of {model_name!r} is named {missing[0]!r} (module names end in: {shown})")


class Task(abc.ABC):
    """One training setting: model + data + loss + evaluation (see module docstring for the contract)."""

    #: registry name (set by :func:`register_task`)
    name: ClassVar[str] = ""
    #: dataclass validating ``cfg.task_args``
    args_cls: ClassVar[type] = NoArgs
    #: the metrics ``evaluate`` returns and what they mean (validation copies carry a ``val_`` prefix, anchors an
    #: ``anchor_<name>_`` prefix: both are looked up by the plain name)
    metrics: ClassVar[dict[str, Metric]] = {"accuracy": Metric()}

    model: torch.nn.Module

    def __init__(self, cfg: ExperimentConfig, seed: int) -> None:
        """Store the config and seed and parse ``cfg.task_args`` into ``self.args`` (subclasses call this first)."""
        self.cfg = cfg
        self.seed = int(seed)
        self.args = parse_dataclass(self.args_cls, cfg.task_args, "task_args.")
        self.device = resolve_device(cfg.train.device)

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Checks of ``cfg`` that need no model or data load (``flatpeft config`` runs them too): ``task_args``
        and the device. Subclasses add theirs (data files, the test set) and call this."""
        parse_dataclass(cls.args_cls, cfg.task_args, "task_args.")
        resolve_device(cfg.train.device)

    @classmethod
    def data_paths(cls, cfg: ExperimentConfig) -> dict[str, Path]:
        """The files a run of ``cfg`` reads its data (or cached starting weights) from, by role (``{"train": path,
        "test": path}``), found without building the task (a cache built on first use may not exist yet); their
        sha256 goes into ``eval.json`` (``data_sha256``), and a resumed run whose recorded hashes differ from
        the current files' is never reused. Default: none."""
        return {}

    # ---- required -------------------------------------------------------------------------------
    @abc.abstractmethod
    def train_batches(self) -> Iterator[Any]:
        """Infinite iterator of training batches, order fixed by ``self.seed`` (same for every method)."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch`` (forward only; the caller runs backward)."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]:
        """Metrics on ``split`` (``"test"``, ``"train"``, ``"val"``); must contain ``"accuracy"``."""

    # ---- defaults -------------------------------------------------------------------------------
    def anchors(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Reference predictors on ``split`` with this run's data (its shots and seed), by name (``majority``,
        ``probe``, ``zero_shot``; :mod:`flatpeft.experiments.anchors`), each with the metric names of
        :meth:`evaluate`. The model is not trained; its weights are left as they are. Default: none."""
        return {}

    def save(self, out_dir: str | Path) -> None:
        """Write the trained weights to ``out_dir/adapter`` (peft ``save_pretrained``: adapter_config.json +
        adapter_model.safetensors, including ``modules_to_save``); a model without ``save_pretrained``
        gets its trainable tensors in ``out_dir/adapter/trainable.safetensors``."""
        target = Path(out_dir) / "adapter"
        target.mkdir(parents=True, exist_ok=True)
        if hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(str(target))
        else:
            from safetensors.torch import save_file

            tensors = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(tensors, str(target / "trainable.safetensors"))

    def load_weights(self, run_dir: str | Path) -> None:
        """Load what :meth:`save` wrote into ``self.model`` (peft adapter, full model, or trainable tensors)."""
        src = Path(run_dir) / "adapter"
        if (src / "adapter_model.safetensors").is_file():
            from peft.utils import set_peft_model_state_dict

            state = self._load_tensors(src / "adapter_model.safetensors")
            result = set_peft_model_state_dict(self.model, state)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "modules_to_save" in k]
            if unexpected:
                raise ValueError(f"{src}: adapter keys do not match the model: {unexpected[:5]}")
        elif (src / "model.safetensors").is_file():
            state = self._load_tensors(src / "model.safetensors")
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"{src}/model.safetensors: unexpected keys {unexpected[:5]}")
        elif (src / "trainable.safetensors").is_file():
            state = self._load_tensors(src / "trainable.safetensors")
            _, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"{src}/trainable.safetensors: unexpected keys {unexpected[:5]}")
        else:
            raise ValueError(f"run directory {str(run_dir)!r} has no saved weights under adapter/ "
                             "(expected adapter_model.safetensors, model.safetensors or trainable.safetensors)")

    def _load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """Read a safetensors file; a corrupt one raises ``ValueError`` naming the file."""
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(self.device))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError
            raise ValueError(f"{path}: cannot read the saved weights ({type(err).__name__}: {err}); the file is "
                             "corrupt or not a safetensors file: retrain the run") from None

    @classmethod
    def load(cls, run_dir: str | Path, cfg: ExperimentConfig) -> "Task":
        """Rebuild the task from ``cfg`` (seed ``cfg.train.seed``) and load the weights saved in ``run_dir``.

        Saved weights whose shapes do not fit the rebuilt model (``config.yaml`` edited after training, e.g.
        ``peft.r``, or a training file that gained a label, which changes the head) raise ``ValueError`` naming
        the tensor and both shapes."""
        task = cls(cfg, cfg.train.seed)
        try:
            task.load_weights(run_dir)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
            if not lines:
                raise
            raise ValueError(f"run directory {str(run_dir)!r}: the saved weights do not fit the model rebuilt from "
                             f"its config.yaml and data ({lines[0]}{'; ...' if len(lines) > 1 else ''}); was "
                             "config.yaml edited after training (e.g. peft.r), or did the training file gain a "
                             "label? Restore them, or train a new run") from None
        return task

    def analysis_batches(self, n: int) -> list[Any]:
        """The first ``n`` training batches of a fresh :meth:`train_batches` iterator (for sharpness analysis)."""
        it = self.train_batches()
        return [next(it) for _ in range(n)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters with ``requires_grad`` (what the optimizer trains)."""
        return [p for p in self.model.parameters() if p.requires_grad]


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a :class:`Task` subclass under ``name`` (names are unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task: name must be a non-empty string, got {name!r}")

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"register_task({name!r}): {cls!r} is not a Task subclass")
        existing = TASKS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"task {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def _import_lazy_modules() -> list[str]:
    """Import every module in :data:`LAZY_TASK_MODULES` that exists; return import errors as text."""
    problems = []
    for module in LAZY_TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):  # the module itself is absent: fine
                continue
            problems.append(f"{module}: {err}")
        except Exception as err:  # noqa: BLE001 - report, do not hide, a broken task module
            problems.append(f"{module}: {type(err).__name__}: {err}")
    return problems


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name`` (imports the built-in and multimodal task modules on demand)."""
    if name in TASKS:
        return TASKS[name]
    problems = _import_lazy_modules()
    if name in TASKS:
        return TASKS[name]
    msg = f"task: unknown task {name!r} (valid: {', '.join(sorted(TASKS)) or 'none registered'})"
    if problems:
        msg += "; modules that failed to import: " + "; ".join(problems)
    raise ValueError(msg)


def available_tasks() -> list[str]:
    """Sorted names of all tasks (after importing the lazily registered modules)."""
    _import_lazy_modules()
    return sorted(TASKS)
