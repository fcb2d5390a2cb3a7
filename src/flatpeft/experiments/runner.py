"""The runner: one training run (:func:`train_run`), re-evaluation (:func:`evaluate_run`) and a paired
multi-method, multi-seed comparison (:func:`compare`).

Fairness of a comparison (``shared/spec/reference-results.md``): for one seed every method starts from the
same initialisation, sees the same examples in the same batch order and the same dropout stream. The
runner seeds all generators (``transformers.set_seed``) before building the task *and again after*, so the
optimizer construction cannot shift the stream; the task draws its batch order from its own generator; the
engine replays the random state in pass 2 of two-pass methods, so a two-pass step consumes exactly the
stream of one pass.

A run directory holds ``config.yaml`` (the resolved config, absolute paths, ``train.seed`` = the run
seed), ``metrics.jsonl`` and ``tb/`` (TensorBoard) with the training log, ``adapter/`` (peft
``save_pretrained``), and ``eval.json`` (written last, atomically: its presence marks a finished run).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import ExperimentConfig, absolutize_paths, load_config, save_config
from .tasks import Task, get_task

__all__ = ["RUN_FILES", "RunExistsError", "train_run", "evaluate_run", "compare", "method_kwargs_for",
           "run_dir_for", "is_finished", "check_method_name"]

#: Files and folders a run writes (``--overwrite`` removes exactly these, nothing else).
RUN_FILES = ("config.yaml", "eval.json", "metrics.jsonl", "tb", "adapter")


class RunExistsError(ValueError):
    """An output directory already holds results and ``overwrite`` was not given."""


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename), so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def is_finished(run_dir: str | Path) -> bool:
    """A run is finished when its ``eval.json`` exists."""
    return (Path(run_dir) / "eval.json").is_file()


def _refuse_existing(out_dir: Path, overwrite: bool) -> list[str]:
    """Raise :class:`RunExistsError` when ``out_dir`` holds run files and not ``overwrite``; return them."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise RunExistsError(f"output directory {str(out_dir)!r} already holds a run ({', '.join(existing)}); "
                             "pass --overwrite (overwrite=True) to replace it, or choose another --output-dir")
    return existing


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse one that holds run files unless ``overwrite`` (then remove only those)."""
    existing = _refuse_existing(out_dir, overwrite)
    import shutil

    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def check_method_name(name: str) -> None:
    """Raise ``ValueError`` naming ``method.name`` and the valid names when ``name`` is not registered."""
    import flatpeft

    if name not in flatpeft.METHODS:
        raise ValueError(f"method.name: unknown method {name!r} (valid: {', '.join(flatpeft.METHODS)})")


def _set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) through ``transformers.set_seed``."""
    from transformers import set_seed

    set_seed(seed)


def build_optimizer(task: Task, cfg: ExperimentConfig, seed: int):
    """``flatpeft.create_optimizer`` over the task's model with the config's method and loop settings.

    Keywords: ``cfg.method`` minus ``name`` (passed through), ``lr``, ``total_steps`` (for rho schedules),
    the engine's ``seed`` (the run seed unless the method sets one) and ``weight_decay`` when set.
    """
    import flatpeft

    kwargs = {k: v for k, v in cfg.method.items() if k != "name"}
    kwargs.setdefault("seed", seed)
    if cfg.train.weight_decay is not None:
        kwargs.setdefault("weight_decay", cfg.train.weight_decay)
    try:
        return flatpeft.create_optimizer(task.model, cfg.method["name"], base_optimizer=cfg.train.base_optimizer,
                                         lr=cfg.train.lr, total_steps=cfg.train.steps, **kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"method: {err}") from None


def _log_record(step: int, window: int, sums: dict[str, torch.Tensor], opt, elapsed: float) -> dict[str, float]:
    """One log line: means over the last ``window`` steps of the device-side sums (the only host sync)."""
    rec: dict[str, float] = {"step": step, "lr": float(opt.param_groups[0]["lr"]), "time_s": elapsed}
    for key, value in sums.items():
        rec[key] = float(value) / window
    if "loss_perturbed" in rec and "loss" in rec:
        rec["loss_gap"] = rec["loss_perturbed"] - rec["loss"]
    return rec


def _validation_record(task: Task, step: int) -> dict[str, float]:
    """Validation metrics at ``step`` (``val_`` prefix); the global random state is left untouched."""
    from flatpeft.optim.rng import RNGState

    state = RNGState.capture()
    try:
        metrics = task.evaluate(task.model, "val")
    finally:
        state.restore()
        task.model.train()
    return {"step": step, **{f"val_{k}": float(v) for k, v in metrics.items()}}


def _train_loop(task: Task, opt, cfg: ExperimentConfig, out_dir: Path, progress: bool) -> dict[str, float]:
    """Run ``cfg.train.steps`` optimizer steps; log every ``train.log_every`` steps; return timing and last loss.

    The per-step metrics stay on the device (summed into running tensors); they are read only at log steps.
    Time per step counts everything of the loop (batch assembly, passes, update, logging) and no evaluation.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    model, steps, every = task.model, cfg.train.steps, cfg.train.log_every
    model.train()
    batches = task.train_batches()
    writer = SummaryWriter(log_dir=str(out_dir / "tb"))
    log_file = (out_dir / "metrics.jsonl").open("w")
    sums: dict[str, torch.Tensor] = {}
    window = 0
    last: dict[str, float] = {}
    bar = tqdm(range(1, steps + 1), desc=f"{cfg.method['name']} seed {cfg.train.seed}", unit="step",
               disable=not progress, leave=False)
    val_steps = set(cfg.train.val_eval_steps)
    sync = torch.cuda.synchronize if task.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    try:
        for step in bar:
            batch = next(batches)

            def closure(batch=batch):
                loss = task.loss(model, batch)
                loss.backward()
                return loss

            opt.zero_grad(set_to_none=True)
            loss = opt.step(closure)
            stats = dict(opt.metrics)
            stats.setdefault("loss", loss.detach())
            for key in ("loss", "loss_perturbed", "perturbation_norm"):
                if key in stats:
                    value = stats[key].detach().float()
                    sums[key] = sums[key] + value if key in sums else value.clone()
            window += 1
            if step % every == 0 or step == steps:
                last = _log_record(step, window, sums, opt, time.perf_counter() - start)
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"training loss is {last['loss']} at step {step}; "
                                             "lower train.lr or method.rho")
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
                for key, value in last.items():
                    if key not in ("step", "time_s"):
                        writer.add_scalar(f"train/{key}", value, step)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                sums, window = {}, 0
            if step in val_steps:
                paused = time.perf_counter()
                val = _validation_record(task, step)
                log_file.write(json.dumps(val) + "\n")
                log_file.flush()
                for key, value in val.items():
                    if key != "step":
                        writer.add_scalar(f"val/{key}", value, step)
                start += time.perf_counter() - paused  # evaluation is not training time
        sync()
        train_time = time.perf_counter() - start
    finally:
        bar.close()
        log_file.close()
        writer.close()
    return {"train_time_s": train_time, "time_per_step": train_time / steps, "final_loss": last.get("loss", math.nan)}


def evaluate_task(task: Task, splits: Sequence[str]) -> dict[str, float]:
    """Evaluate ``splits``; ``test`` metrics keep their names, others get a ``<split>_`` prefix."""
    out: dict[str, float] = {}
    for split in splits:
        prefix = "" if split == "test" else f"{split}_"
        out.update({f"{prefix}{k}": float(v) for k, v in task.evaluate(task.model, split).items()})
    return out


def train_run(cfg: ExperimentConfig, *, seed: int | None = None, out_dir: str | Path | None = None,
              overwrite: bool = False, extra_eval: Callable[[Task], dict[str, float]] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train one method with one seed; return the metrics also written to ``out_dir/eval.json``.

    Args:
        cfg: the experiment config (``cfg.method`` picks the method).
        seed: run seed (default ``cfg.train.seed``); written into the saved config as ``train.seed``.
        out_dir: run directory (default ``cfg.output_dir``); an existing run there raises
            :class:`RunExistsError` unless ``overwrite``.
        extra_eval: ``extra_eval(task) -> dict`` of more metrics, merged into ``eval.json``.
        progress: show a tqdm bar.

    ``eval.json`` holds ``accuracy``, ``macro_f1`` (test split), ``<split>_accuracy`` / ``<split>_macro_f1``
    for the other ``train.eval_splits``, ``time_per_step`` (s, no evaluation), ``train_time_s``,
    ``eval_time_s``, ``final_loss``, ``steps``, ``seed``, ``method``, ``task`` and what ``extra_eval`` returns.
    """
    seed = cfg.train.seed if seed is None else int(seed)
    out = Path(cfg.output_dir if out_dir is None else out_dir)
    cfg = absolutize_paths(copy.deepcopy(cfg))
    cfg.train.seed, cfg.output_dir = seed, str(out.resolve())
    cfg.method = method_kwargs_for(cfg.method["name"], cfg.method, warn=True)
    task_cls = get_task(cfg.task)
    _refuse_existing(out, overwrite)  # before the (slow) build; files are touched only once it succeeded

    _set_seed(seed)
    task = task_cls(cfg, seed)
    opt = build_optimizer(task, cfg, seed)
    _prepare_out_dir(out, overwrite)
    save_config(cfg, out / "config.yaml")
    _set_seed(seed)  # every method of one seed starts the training loop from the same random state
    timing = _train_loop(task, opt, cfg, out, progress)

    start = time.perf_counter()
    metrics: dict[str, Any] = evaluate_task(task, cfg.train.eval_splits)
    if extra_eval is not None:
        metrics.update(extra_eval(task))
    metrics.update(timing, eval_time_s=time.perf_counter() - start, steps=cfg.train.steps, seed=seed,
                   method=cfg.method["name"], task=cfg.task)
    task.save(out)
    _write_json(out / "eval.json", metrics)
    return metrics


def evaluate_run(run_dir: str | Path, data: str | Path | None = None,
                 splits: Sequence[str] = ("test",)) -> dict[str, float]:
    """Reload a finished run (``Task.load``) and evaluate it; ``data`` replaces the test file.

    Returns the metrics (``accuracy``, ``macro_f1`` for the test split; ``<split>_...`` for others).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"run directory {str(run_dir)!r} has no config.yaml (not a flatpeft run directory)")
    cfg = load_config(run_dir / "config.yaml")
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"--data: file {str(data)!r} does not exist")
        cfg.data.test = str(path.resolve())
    task_cls = get_task(cfg.task)
    _set_seed(cfg.train.seed)
    task = task_cls.load(run_dir, cfg)
    return evaluate_task(task, splits)


def method_kwargs_for(method: str, shared: dict[str, Any], warn: bool = False) -> dict[str, Any]:
    """The ``method`` section actually used for ``method``.

    ``shared`` is the config's ``method`` section. Its keywords go to every method that accepts them;
    a keyword specific to *other* registered methods (``fraction`` of flatpo when running ``sam``, e.g.
    after ``--set method.name=sam`` or in ``compare``) is dropped (with a warning on stderr when ``warn``),
    and a keyword no method knows is kept, so ``create_optimizer`` accepts it as a base-optimizer keyword
    (``weight_decay``) or rejects it by name. The run's ``config.yaml`` records the section as used.
    """
    import sys

    import flatpeft

    check_method_name(method)
    own = set(flatpeft.get_method(method).all_defaults())
    specific = set().union(*(flatpeft.get_method(m).all_defaults() for m in flatpeft.METHODS))
    dropped = [k for k in shared if k != "name" and k not in own and k in specific]
    if dropped and warn:
        print(f"flatpeft: note: method {method!r} does not take {', '.join(dropped)} (keywords of other "
              "methods); ignored", file=sys.stderr)
    out = {k: v for k, v in shared.items() if k != "name" and k not in dropped}
    return {"name": method, **out}


def run_dir_for(out_dir: str | Path, method: str, seed: int) -> Path:
    """``<out_dir>/<method>/seed<seed>``."""
    return Path(out_dir) / method / f"seed{seed}"


def compare(cfg: ExperimentConfig, methods: Sequence[str], seeds: Sequence[int] | int, out_dir: str | Path | None = None,
            overwrite: bool = False, resume: bool = False, extra_eval: Callable[[Task], dict[str, float]] | None = None,
            progress: bool = True) -> "Any":
    """Train every method with every seed (seed-major: all methods of seed 0, then seed 1, ...) and tabulate.

    Args:
        methods: method names; ``base`` is the reference of the paired differences (needed for them).
        seeds: a count ``n`` (seeds ``train.seed .. train.seed+n-1``) or explicit seeds.
        out_dir: default ``cfg.output_dir``; runs go to ``<out_dir>/<method>/seed<k>``.
        overwrite: replace existing runs. resume: keep finished runs (``eval.json`` present) and redo
            unfinished ones. Without either, an output directory that already holds runs is refused.

    Returns the :class:`~flatpeft.experiments.results.CompareResult` (also written as ``results.md``,
    ``results.csv`` and ``results.png``, rewritten after every finished run, so they always show the finished
    runs even if the comparison is killed). A ``KeyboardInterrupt`` writes the tables and is re-raised.
    """
    from tqdm.auto import tqdm

    from . import results as tables

    out = Path(cfg.output_dir if out_dir is None else out_dir)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("--methods: give at least one method")
    seed_list = list(range(cfg.train.seed, cfg.train.seed + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("--seeds: give at least one seed")
    per_method = {m: method_kwargs_for(m, cfg.method) for m in methods}
    get_task(cfg.task)
    existing = sorted(str(p.parent.relative_to(out)) for p in out.glob("*/seed*/config.yaml")) if out.is_dir() else []
    if existing and not (overwrite or resume):
        raise RunExistsError(f"output directory {str(out)!r} already holds runs ({', '.join(existing[:4])}"
                             f"{', ...' if len(existing) > 4 else ''}); pass --overwrite to replace them or "
                             "--resume to keep finished runs and redo the rest")
    out.mkdir(parents=True, exist_ok=True)
    save_config(absolutize_paths(cfg), out / "compare_config.yaml")  # the shared config, for the record
    (out / "compare_plan.json").write_text(json.dumps({"methods": methods, "seeds": seed_list}) + "\n")
    jobs = [(s, m) for s in seed_list for m in methods]
    outer = tqdm(jobs, desc="compare", unit="run", disable=not progress)
    try:
        for seed, method in outer:
            outer.set_postfix_str(f"{method} seed {seed}")
            run = run_dir_for(out, method, seed)
            if resume and not overwrite and is_finished(run):
                continue
            run_cfg = copy.deepcopy(cfg)
            run_cfg.method = per_method[method]
            train_run(run_cfg, seed=seed, out_dir=run, overwrite=True if resume else overwrite,
                      extra_eval=extra_eval, progress=progress)
            tables.collect_and_write(out, methods=methods)  # tables always reflect the finished runs
    except KeyboardInterrupt:
        outer.close()
        tables.collect_and_write(out, methods=methods)
        print(f"\ninterrupted: tables of the finished runs written to {out}")
        raise
    outer.close()
    return tables.collect_and_write(out, methods=methods)
