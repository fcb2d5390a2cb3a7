"""Experiments: typed configs, tasks, the runner (train / eval / compare) and results tables.

Public entry points::

    from flatpeft.experiments import load_config, train_run, evaluate_run, compare
    cfg = load_config("finefoods_fewshot", ["method.name=sam"])   # a built-in config by name, or a YAML path
    metrics = train_run(cfg, seed=0, out_dir="runs/sam0")

Submodules are imported lazily so ``import flatpeft.experiments.tasks`` stays light.
"""
from __future__ import annotations

from flatpeft._extras import require

require("cli", "yaml", "numpy", "pandas", "scipy", "matplotlib", "transformers", "peft", "tqdm", "safetensors",
        part="flatpeft.experiments")

from .config import ExperimentConfig, load_config, save_config
from .tasks import Task, available_tasks, get_task, register_task

__all__ = ["ExperimentConfig", "load_config", "save_config", "Task", "register_task", "get_task",
           "available_tasks", "train_run", "evaluate_run", "compare"]


def __getattr__(name: str):
    if name in ("train_run", "evaluate_run", "compare"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'flatpeft.experiments' has no attribute {name!r}")
