"""The runner: one training run (:func:`train_run`), re-evaluation (:func:`evaluate_run`) and a paired
multi-method, multi-seed comparison (:func:`compare`).

Fairness of a comparison (see ``docs/algorithms.md``): for one seed every method starts from the
same initialisation, sees the same examples in the same batch order and the same dropout stream. The
runner seeds all generators (``transformers.set_seed``) before building the task *and again after*, so the
optimizer construction cannot shift the stream; the task draws its batch order from its own generator; the
engine replays the random state in pass 2 of two-pass methods, so a two-pass step consumes exactly the
stream of one pass.

A run directory holds ``.flatpeft-run.json`` (its manifest, written first), ``config.yaml`` (the resolved
config, absolute paths, ``train.seed`` = the run seed), ``metrics.jsonl`` and ``tb/`` (TensorBoard, when the
``tensorboard`` extra is installed) with the training log, ``adapter/`` (peft ``save_pretrained``), and ``eval.json``.
The manifest and ``eval.json`` name the code that trained the run (``code``:
:func:`flatpeft.experiments.provenance.code_record`) and ``eval.json`` the sha256 of its data files
(``data_sha256``); a resumed comparison reuses a finished run only when its settings, data hashes and code are the
current ones (:func:`match_run`). A run is built aside and renamed
into place only when it finished (:mod:`flatpeft.experiments.rundir`), so a run directory always holds a
whole run; a run whose loss (either pass of a two-pass method) or trainable weights become non-finite stops
with :class:`RunDivergedError` and leaves nothing behind.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from flatpeft._checks import SEED_MAX

from .config import (ExperimentConfig, absolutize_paths, config_from_dict, config_to_dict, missing_keys,
                     read_config_mapping, resolve_model_path, resolve_test_ref, save_config)
from .rundir import (COMPARE_MANIFEST, RUN_ENTRIES, RUN_MANIFEST, DirectoryLockedError, RunExistsError,
                     as_os_error, check_output_dir, check_replaceable, dir_lock, install_run, is_finished,
                     read_manifest, recover, run_lock, staging_dir, write_json, write_manifest)
from .provenance import code_label, code_record, group_by_code, same_code
from .tasks import Task, get_task

__all__ = ["RUN_FILES", "RunExistsError", "RunDivergedError", "DirectoryLockedError", "train_run", "evaluate_run",
           "compare", "method_kwargs_for", "run_dir_for", "is_finished", "check_method_name", "validate_config",
           "load_run_config", "run_settings", "settings_diff", "RunMatch", "match_run", "data_hashes", "run_code",
           "KEEP_OTHER_CODE_HINT"]

#: Files and folders a run writes (``--overwrite`` removes exactly these, nothing else).
RUN_FILES = (RUN_MANIFEST, *RUN_ENTRIES)


class RunDivergedError(ValueError):
    """Training produced a non-finite loss (either pass) or non-finite trainable weights."""

    def __init__(self, method: str, seed: int, step: int, what: str) -> None:
        self.method, self.seed, self.step, self.what = method, seed, step, what
        super().__init__(f"method {method!r}, seed {seed}: training diverged at step {step} ({what} not finite); "
                         "no results written: lower train.lr or method.rho")


def _sha256(path: str | Path) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_method_name(name: str) -> None:
    """Raise ``ValueError`` naming ``method.name`` and the valid names when ``name`` is not registered."""
    import flatpeft

    if name not in flatpeft.method_names():  # the live registry: methods added with register_method count
        raise ValueError(f"method.name: unknown method {name!r} (valid: {', '.join(flatpeft.method_names())})")


def _set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) through ``transformers.set_seed``."""
    from transformers import set_seed

    set_seed(seed)


def _optimizer_kwargs(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Keywords of ``create_optimizer``: ``cfg.method`` minus ``name``, ``lr``, ``total_steps``, the engine's
    ``seed`` (the run seed unless the method sets one) and ``weight_decay`` when set."""
    kwargs = {k: v for k, v in cfg.method.items() if k != "name"}
    kwargs.setdefault("seed", seed)
    if cfg.train.weight_decay is not None:
        kwargs.setdefault("weight_decay", cfg.train.weight_decay)
    return {"base_optimizer": cfg.train.base_optimizer, "lr": cfg.train.lr, "total_steps": cfg.train.steps, **kwargs}


def build_optimizer(task: Task, cfg: ExperimentConfig, seed: int):
    """``flatpeft.create_optimizer`` over the task's model with the config's method and loop settings."""
    import flatpeft

    try:
        return flatpeft.create_optimizer(task.model, cfg.method["name"], **_optimizer_kwargs(cfg, seed))
    except (ValueError, TypeError) as err:
        raise ValueError(f"method: {err}") from None


def _probe_model() -> torch.nn.Module:
    """A two-layer LoRA model (peft) on which method keywords are checked without building the task."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]))


def validate_config(cfg: ExperimentConfig, methods: Sequence[str] | None = None) -> None:
    """Every check that needs no model or data load: what ``train``, ``compare`` and ``config`` refuse alike.

    Method names and keywords (each of ``methods``, default ``cfg.method["name"]``; keywords are checked by
    ``create_optimizer`` on a tiny LoRA model), a built-in model (its name, and that it is prepared), the task
    name, ``task_args`` and the task's own config checks (data files, the test set) and the device. Raises
    ``ValueError`` naming the key (``AssetMissingError`` for an asset that is not prepared).
    """
    import flatpeft

    resolve_model_path(cfg.model)  # builtin:<name>: known and prepared, as train needs it; other names unchanged
    names = [cfg.method["name"]] if methods is None else list(methods)
    for name in names:
        check_method_name(name)
    probe = _probe_model()
    for name in names:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.method = method_kwargs_for(name, cfg.method)
        try:
            flatpeft.create_optimizer(probe, name, **_optimizer_kwargs(run_cfg, cfg.train.seed))
        except (ValueError, TypeError) as err:
            raise ValueError(f"method: {err}") from None
    get_task(cfg.task).check_config(cfg)


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


_WATCHED = ("loss", "loss_perturbed", "trainable weights")


class _DivergenceWatch:
    """Device-side record of the first step whose loss, perturbed loss or trainable weights are non-finite.

    :meth:`update` runs one fused check per step without a host sync (``_foreach_norm`` with ``ord=inf`` is
    finite exactly when every entry is); :meth:`check` reads the record (one sync) at log steps and raises
    :class:`RunDivergedError` naming method, seed, step and what was non-finite.
    """

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device, method: str, seed: int) -> None:
        self.params, self.method, self.seed = params, method, seed
        self.first = torch.zeros((), dtype=torch.long, device=device)
        self.code = torch.zeros((), dtype=torch.long, device=device)

    def update(self, step: int, stats: dict[str, torch.Tensor]) -> None:
        """Fold step ``step`` (its metrics ``stats`` and the current weights) into the record."""
        finite = [torch.isfinite(stats["loss"].float()).all()]
        lp = stats.get("loss_perturbed")
        finite.append(torch.isfinite(lp.float()).all() if lp is not None else finite[0].new_ones(()))
        norms = torch._foreach_norm(self.params, float("inf")) if self.params else []
        finite.append(torch.isfinite(torch.stack(norms)).all() if norms else finite[0].new_ones(()))
        flags = torch.stack(finite).to(self.first.device)
        code = ((~flags).long() * torch.tensor([1, 2, 4], device=flags.device)).sum()
        new = (self.first == 0) & (code > 0)
        self.first = torch.where(new, torch.full_like(self.first, step), self.first)
        self.code = torch.where(new, code, self.code)

    def check(self) -> None:
        """Raise :class:`RunDivergedError` if any step so far was non-finite."""
        step = int(self.first)
        if step:
            code = int(self.code)
            what = ", ".join(name for bit, name in enumerate(_WATCHED) if code & (1 << bit))
            raise RunDivergedError(self.method, self.seed, step, what)


_TB_NOTICE_SHOWN = False


def _tensorboard_writer(log_dir: Path):
    """A ``SummaryWriter`` for ``log_dir`` when tensorboard is installed (``flatpeft[tensorboard]``), else ``None``:
    ``metrics.jsonl`` holds the same numbers, so a run without it loses nothing; a note says so once per process."""
    global _TB_NOTICE_SHOWN
    from flatpeft._extras import missing

    if missing("tensorboard"):
        if not _TB_NOTICE_SHOWN:
            print("flatpeft: note: tensorboard is not installed, so runs write no tb/ (metrics.jsonl has the same "
                  "curves); install the extra for it: pip install 'flatpeft[tensorboard]'", file=sys.stderr)
            _TB_NOTICE_SHOWN = True
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def _train_loop(task: Task, opt, cfg: ExperimentConfig, out_dir: Path, progress: bool) -> dict[str, float]:
    """Run ``cfg.train.steps`` optimizer steps; log every ``train.log_every`` steps; return timing and last loss.

    The per-step metrics stay on the device (summed into running tensors); they are read only at log steps,
    where divergence (:class:`_DivergenceWatch`) is checked before anything is written, so ``metrics.jsonl``
    never holds a non-finite number. Time per step counts everything of the loop (batch assembly, passes,
    update, logging) and no evaluation.
    """
    from tqdm.auto import tqdm

    model, steps, every = task.model, cfg.train.steps, cfg.train.log_every
    model.train()
    batches = task.train_batches()
    watch = _DivergenceWatch([p for p in model.parameters() if p.requires_grad], task.device,
                             cfg.method["name"], cfg.train.seed)
    writer = _tensorboard_writer(out_dir / "tb")
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
            stats.setdefault("loss", torch.as_tensor(loss).detach())
            watch.update(step, stats)
            for key in ("loss", "loss_perturbed", "perturbation_norm"):
                if key in stats:
                    value = stats[key].detach().float()
                    sums[key] = sums[key] + value if key in sums else value.clone()
            window += 1
            if step % every == 0 or step == steps:
                watch.check()
                last = _log_record(step, window, sums, opt, time.perf_counter() - start)
                log_file.write(json.dumps(last, allow_nan=False) + "\n")
                log_file.flush()
                for key, value in last.items():
                    if writer is not None and key not in ("step", "time_s"):
                        writer.add_scalar(f"train/{key}", value, step)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                sums, window = {}, 0
            if step in val_steps:
                watch.check()
                paused = time.perf_counter()
                val = _validation_record(task, step)
                log_file.write(json.dumps(val) + "\n")
                log_file.flush()
                for key, value in val.items():
                    if writer is not None and key != "step":
                        writer.add_scalar(f"val/{key}", value, step)
                start += time.perf_counter() - paused  # evaluation is not training time
        sync()
        train_time = time.perf_counter() - start
    finally:
        bar.close()
        log_file.close()
        if writer is not None:
            writer.close()
    return {"train_time_s": train_time, "time_per_step": train_time / steps, "final_loss": last.get("loss", math.nan)}


def _anchors(task: Task, cfg: ExperimentConfig) -> dict[str, dict[str, float]] | None:
    """The task's anchors on the test split, evaluated before training (``train.anchors``), or ``None``. The
    global random state is left as it was, so the run trains exactly as without them."""
    if not cfg.train.anchors:
        return None
    from flatpeft.optim.rng import RNGState

    state = RNGState.capture()
    try:
        return {name: {k: float(v) for k, v in metrics.items()} for name, metrics in task.anchors("test").items()}
    finally:
        state.restore()
        task.model.train()


def evaluate_task(task: Task, splits: Sequence[str]) -> dict[str, float]:
    """Evaluate ``splits``; ``test`` metrics keep their names, others get a ``<split>_`` prefix."""
    out: dict[str, float] = {}
    for split in splits:
        prefix = "" if split == "test" else f"{split}_"
        out.update({f"{prefix}{k}": float(v) for k, v in task.evaluate(task.model, split).items()})
    return out


def _data_record(task: Task, splits: Sequence[str]) -> dict[str, Any]:
    """How many examples each evaluated split had (``<split>_examples``) and the sha256 of the task's data files
    (``data_sha256``: ``{"train": ..., "test": ...}``; the task's ``data_files``, else ``Task.data_paths``),
    when the task exposes them."""
    rec: dict[str, Any] = {}
    count = getattr(task, "num_examples", None)
    if callable(count):
        rec.update({f"{split}_examples": int(count(split)) for split in splits})
    files = getattr(task, "data_files", None)
    if files is None and getattr(task, "cfg", None) is not None:
        files = type(task).data_paths(task.cfg)
    files = {name: path for name, path in (files or {}).items() if Path(path).is_file()}
    if files:
        rec["data_sha256"] = {name: _sha256(path) for name, path in files.items()}
    return rec


def _finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with non-finite floats replaced by ``None`` (strict JSON; tables skip them)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def run_settings(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The settings that change a run: its resolved config without ``output_dir`` (JSON-normalised)."""
    return json.loads(json.dumps({k: v for k, v in cfg_dict.items() if k != "output_dir"}, sort_keys=True))


def _fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of :func:`run_settings` of ``cfg`` (recorded in the run's manifest)."""
    return hashlib.sha256(json.dumps(run_settings(config_to_dict(cfg)), sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (free sections like ``method`` are flattened too)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["train.lr (0.001 -> 0.5)", ...]``: the dotted keys whose values differ between two settings dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _run_config(cfg: ExperimentConfig, seed: int, out: Path, warn: bool = False) -> ExperimentConfig:
    """The resolved config a run records: absolute paths, the test set named, ``train.seed`` = the run seed,
    ``output_dir`` = the run directory and the method section as used."""
    run = absolutize_paths(copy.deepcopy(cfg))
    run.train.seed, run.output_dir = seed, str(out.resolve())
    run.method = method_kwargs_for(run.method["name"], run.method, warn=warn)
    return run


def train_run(cfg: ExperimentConfig, *, seed: int | None = None, out_dir: str | Path | None = None,
              overwrite: bool = False, extra_eval: Callable[[Task], dict[str, float]] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train one method with one seed; return the metrics also written to ``out_dir/eval.json``.

    Args:
        cfg: the experiment config (``cfg.method`` picks the method).
        seed: run seed (default ``cfg.train.seed``); written into the saved config as ``train.seed``.
        out_dir: run directory (default ``cfg.output_dir``; ``~`` is expanded). An existing run there raises
            :class:`RunExistsError` unless ``overwrite``; a directory holding files flatpeft did not write is
            always refused. The run is built aside and replaces the old one only once it finished.
        extra_eval: ``extra_eval(task) -> dict`` of more metrics, merged into ``eval.json``.
        progress: show a tqdm bar.

    Raises :class:`RunDivergedError` (nothing written, an old run kept) when the loss of either pass or the
    trainable weights become non-finite, and :class:`DirectoryLockedError` when another process uses ``out_dir``.

    ``eval.json`` holds ``accuracy``, ``macro_f1`` (test split), ``<split>_accuracy`` / ``<split>_macro_f1``
    for the other ``train.eval_splits``, ``<split>_examples``, ``data_sha256``, ``time_per_step`` (s, no
    evaluation), ``train_time_s``, ``eval_time_s``, ``final_loss``, ``steps``, ``seed``, ``method``, ``task``,
    ``code`` (the code that trained the run, also in the manifest) and what ``extra_eval`` returns.
    """
    seed = cfg.train.seed if seed is None else int(seed)
    out = check_output_dir(Path(cfg.output_dir if out_dir is None else out_dir).expanduser(), run=True)
    cfg = _run_config(cfg, seed, out, warn=True)
    validate_config(cfg)
    task_cls = get_task(cfg.task)
    with run_lock(out):
        recover(out)
        check_replaceable(out, overwrite)  # before the (slow) build; the old run stays until the new one finished
        _set_seed(seed)
        task = task_cls(cfg, seed)
        anchors = _anchors(task, cfg)
        opt = build_optimizer(task, cfg, seed)
        staging = staging_dir(out)
        staging.mkdir(parents=True)
        ident = {"method": cfg.method["name"], "seed": seed, "task": cfg.task, "settings": _fingerprint(cfg),
                 "code": code_record()}
        try:
            write_manifest(staging, state="running", **ident)
            save_config(cfg, staging / "config.yaml")
            _set_seed(seed)  # every method of one seed starts the training loop from the same random state
            timing = _train_loop(task, opt, cfg, staging, progress)
            start = time.perf_counter()
            metrics: dict[str, Any] = evaluate_task(task, cfg.train.eval_splits)
            if extra_eval is not None:
                metrics.update(extra_eval(task))
            metrics.update(timing, eval_time_s=time.perf_counter() - start, steps=cfg.train.steps, seed=seed,
                           method=cfg.method["name"], task=cfg.task)
            metrics.update(_data_record(task, cfg.train.eval_splits), code=code_record())
            if anchors is not None:  # flat, like every other metric: anchor_<name>_<metric>
                metrics.update({f"anchor_{name}_{k}": v for name, m in anchors.items() for k, v in m.items()})
            task.save(staging)
            write_json(staging / "eval.json", _finite_or_none(metrics))  # strict JSON: a NaN metric is null
            write_manifest(staging, state="finished", **ident)
            install_run(staging, out)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            os_err = as_os_error(err, out) if isinstance(err, Exception) else None
            if os_err is not None and os_err is not err:  # disk full inside safetensors: a named OSError
                raise os_err from err
            raise
    return metrics


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config recorded in ``run_dir/config.yaml``; refuse one that lacks keys (cut, or not flatpeft's).

    A recorded config holds every key, so a missing one is never filled with a default.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"run directory {str(run_dir)!r} has no config.yaml (not a flatpeft run directory)")
    raw = read_config_mapping(path)
    missing = missing_keys(raw)
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise ValueError(f"{path}: the recorded config is incomplete (missing {shown}); it was cut or not written "
                         "by flatpeft, and flatpeft will not guess defaults for a finished run")
    try:
        return config_from_dict(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def evaluate_run(run_dir: str | Path, data: str | Path | None = None,
                 splits: Sequence[str] = ("test",)) -> dict[str, Any]:
    """Reload a finished run (``Task.load``) and evaluate it; ``data`` replaces the test file.

    Returns the metrics (``accuracy``, ``macro_f1`` for the test split; ``<split>_...`` for others),
    ``<split>_examples`` and ``data_sha256``.
    """
    run_dir = Path(run_dir).expanduser()
    cfg = load_run_config(run_dir)
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise ValueError(f"--data: file {str(data)!r} does not exist")
        cfg.data.test = str(path.resolve())
    bad = [s for s in splits if s not in ("test", "train", "val")]
    if bad or not splits:
        raise ValueError(f"--splits: entries must be test, train or val, got {list(splits)}")
    cfg.train.eval_splits = list(splits)
    task_cls = get_task(cfg.task)
    try:
        task_cls.check_config(cfg)
    except ValueError:
        if data is None and "test" in splits and resolve_test_ref(cfg.data) is None:
            raise ValueError(f"run {str(run_dir)!r} has no test set (it was trained on your own data.train without "
                             "data.test): pass --data FILE to evaluate on a file with the same columns, or --splits "
                             "val (or train,val)") from None
        raise
    _set_seed(cfg.train.seed)
    task = task_cls.load(run_dir, cfg)
    return {**evaluate_task(task, splits), **_data_record(task, splits)}


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
    specific = set().union(*(flatpeft.get_method(m).all_defaults() for m in flatpeft.method_names()))
    dropped = [k for k in shared if k != "name" and k not in own and k in specific]
    if dropped and warn:
        print(f"flatpeft: note: method {method!r} does not take {', '.join(dropped)} (keywords of other "
              "methods); ignored", file=sys.stderr)
    out = {k: v for k, v in shared.items() if k != "name" and k not in dropped}
    return {"name": method, **out}


def run_dir_for(out_dir: str | Path, method: str, seed: int) -> Path:
    """``<out_dir>/<method>/seed<seed>``."""
    return Path(out_dir) / method / f"seed{seed}"


#: Files a compare directory holds besides the method folders.
COMPARE_FILES = ("results.md", "results.csv", "results.png", "compare_config.yaml", "compare_plan.json")
_COMPARE_LOCK = ".flatpeft-lock"


def _is_own_tmp(name: str, own: Sequence[str] | set[str]) -> bool:
    """Whether ``name`` is a temporary file flatpeft writes before renaming it to one of ``own``
    (``results.md.flatpeft-tmp``, ``compare_config.yaml.<pid>.flatpeft-tmp``)."""
    import re

    m = re.fullmatch(r"(?P<base>.+?)(\.\d+)?\.flatpeft-tmp", name)
    return m is not None and m.group("base") in own


def _remove_own_tmp(out: Path) -> None:
    """Remove temporary files a killed compare left in ``out`` (flatpeft's own; call under the compare lock)."""
    own = {COMPARE_MANIFEST, *COMPARE_FILES}
    for p in out.iterdir():
        if p.is_file() and _is_own_tmp(p.name, own):
            p.unlink()


def _foreign_in_compare_dir(out: Path) -> list[str]:
    """Paths (relative to ``out``) in a compare directory that flatpeft did not write; all of them when it has
    no compare manifest. Empty for an absent or empty directory."""
    import re

    if not out.is_dir():
        return [] if not out.exists() else [out.name]
    entries = [p for p in sorted(out.iterdir()) if p.name != _COMPARE_LOCK and not _is_own_tmp(p.name, (COMPARE_MANIFEST,))]
    manifest = read_manifest(out, COMPARE_MANIFEST)
    if manifest is None:
        return [p.name for p in entries]
    own = {COMPARE_MANIFEST, _COMPARE_LOCK, *COMPARE_FILES}
    foreign = []
    for p in entries:
        if p.name in own or _is_own_tmp(p.name, own):
            continue
        if not (p.is_dir() and p.name in manifest.get("methods", [])):
            foreign.append(p.name)
            continue
        for q in sorted(p.iterdir()):
            if q.is_dir() and re.fullmatch(r"seed-?\d+", q.name):
                from .rundir import foreign_entries

                foreign += [f"{p.name}/{q.name}/{n}" for n in foreign_entries(q)]
            elif not re.fullmatch(r"\.seed-?\d+\.flatpeft-(lock|new|old)", q.name):
                foreign.append(f"{p.name}/{q.name}")
    return foreign


#: How the tables and errors name the flag that keeps runs of other code.
KEEP_OTHER_CODE_HINT = "--keep-other-code (keep_other_code=True)"


def _data_paths(cfg: ExperimentConfig) -> dict[str, Path]:
    """:meth:`Task.data_paths` of ``cfg``; empty when they cannot be resolved here (a built-in dataset that is
    not prepared on this machine: the page is rebuilt without it; train and compare refuse it earlier)."""
    try:
        return get_task(cfg.task).data_paths(cfg)
    except ValueError:
        return {}


def data_hashes(cfg: ExperimentConfig) -> dict[str, str]:
    """sha256 of the data files a run of ``cfg`` reads (:meth:`Task.data_paths`), by role; a file that does not
    exist is left out. Hash once per comparison: every run of it reads the same files."""
    out: dict[str, str] = {}
    for role, path in _data_paths(cfg).items():
        if Path(path).is_file():
            out[role] = _sha256(path)
    return out


def run_code(run_dir: str | Path) -> dict[str, Any] | None:
    """The code record of a finished run (its manifest's ``code``, else its ``eval.json``'s); ``None`` when the
    run recorded none (trained before flatpeft recorded the code of each run)."""
    manifest = read_manifest(run_dir) or {}
    code = manifest.get("code")
    if not isinstance(code, dict):
        code = _read_eval(Path(run_dir)).get("code")
    return code if isinstance(code, dict) else None


def _read_eval(run_dir: Path) -> dict[str, Any]:
    """``run_dir/eval.json`` as a dict (empty when absent or unreadable)."""
    try:
        data = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclasses.dataclass
class RunMatch:
    """How a finished run compares with the run a resume would train now (:func:`match_run`).

    ``settings_match``: the recorded settings fingerprint is the planned one; ``settings``: the differing keys
    (``settings_diff``); ``data``: the data files whose recorded sha256 differs from the current file's;
    ``code``: the run's recorded code (``None``: not recorded); ``same_code``: it is the current code."""

    settings_match: bool
    settings: list[str]
    data: list[str]
    code: dict[str, Any] | None
    same_code: bool


def match_run(run: Path, run_cfg: ExperimentConfig, data: dict[str, str] | None = None,
              diff: bool = True, strict_data: bool = True) -> RunMatch:
    """Compare the finished run ``run`` with the planned resolved config ``run_cfg`` (:func:`_run_config`), the
    current data hashes ``data`` (default: computed from ``run_cfg``) and the current code.

    Data are compared by role (``train``, ``test``, ``prealign``) where both the run and the current files have a
    hash; a run that recorded none (older than data hashes) is judged by its code alone. With ``strict_data`` a
    file the run recorded that does not exist now (a cache to be rebuilt) differs too; without, it is not
    compared (the page, which trains nothing). ``diff=False`` skips reading the recorded config when the
    fingerprints differ (``settings`` then lists nothing)."""
    manifest = read_manifest(run) or {}
    settings_match = manifest.get("settings") == _fingerprint(run_cfg)
    settings: list[str] = []
    if diff and not settings_match:
        recorded = run_settings(config_to_dict(load_run_config(run)))
        settings = settings_diff(recorded, run_settings(config_to_dict(run_cfg)))
    current = data_hashes(run_cfg) if data is None else data
    recorded_data = _read_eval(run).get("data_sha256")
    recorded_data = recorded_data if isinstance(recorded_data, dict) else {}
    files = _data_paths(run_cfg) if recorded_data else {}
    changed = [f"data.{role} ({files.get(role, role)}: sha256 {str(recorded_data[role])[:12]}... when trained, "
               f"{current[role][:12]}... now)"
               for role in sorted(set(recorded_data) & set(current)) if recorded_data[role] != current[role]]
    if strict_data:
        changed += [f"data.{role} ({files[role]}: sha256 {str(recorded_data[role])[:12]}... when trained, the file "
                    "does not exist now; a cache is rebuilt by the next run: train one run to rebuild it, then "
                    "resume compares it)"
                    for role in sorted(set(recorded_data) - set(current))
                    if role in files and not Path(files[role]).is_file()]
    code = run_code(run)
    return RunMatch(settings_match, settings, changed, code, same_code(code, code_record()))


def _resume_conflicts(plan: dict[tuple[str, int], ExperimentConfig], out: Path,
                      data: dict[str, str]) -> tuple[list[str], list[str]]:
    """For every finished run of ``plan`` in ``out``: the settings, and the data files, that differ from the
    recorded ones (each item naming up to three runs)."""
    settings: dict[str, list[str]] = {}
    changed: dict[str, list[str]] = {}
    for (method, seed), run_cfg in plan.items():
        run = run_dir_for(out, method, seed)
        if not is_finished(run):
            continue
        match = match_run(run, run_cfg, data)
        for item in match.settings:
            settings.setdefault(item, []).append(f"{method}/seed{seed}")
        for item in match.data:
            changed.setdefault(item, []).append(f"{method}/seed{seed}")
    fmt = lambda d: [f"{item} in {', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}"  # noqa: E731
                     for item, runs in d.items()]
    return fmt(settings), fmt(changed)


def _valid_runs(plan: dict[tuple[str, int], ExperimentConfig], out: Path, data: dict[str, str] | None = None,
                keep_other_code: bool = False, strict_data: bool = True) -> list[tuple[str, int, Path]]:
    """Finished runs of ``plan`` whose recorded settings are the planned ones, whose data are the current files
    and (unless ``keep_other_code``) whose code is the current code: a table never mixes settings or data, and
    mixes code only when asked (and then says so). ``data``: the current data hashes (default: computed once);
    ``strict_data``: see :func:`match_run`."""
    rows = []
    for (method, seed), run_cfg in plan.items():
        run = run_dir_for(out, method, seed)
        if not is_finished(run):
            continue
        if data is None:
            data = data_hashes(run_cfg)
        match = match_run(run, run_cfg, data, diff=False, strict_data=strict_data)
        if match.settings_match and not match.data and (keep_other_code or match.same_code):
            rows.append((method, seed, run))
    return rows


def code_notes(runs: Sequence[tuple[str, int, Path]]) -> list[str]:
    """Lines for a table naming the code behind its runs: one version, or every version with its runs."""
    groups = group_by_code((f"{method} seed {seed}", run_code(run)) for method, seed, run in runs)
    current = code_label(code_record())
    if len(groups) <= 1:
        return [f"Code: every run trained by {label}{' (the current code)' if label == current else ''}."
                for label in groups]
    lines = [f"**Code: runs of {len(groups)} code versions in this table** (kept with {KEEP_OTHER_CODE_HINT}; "
             "their numbers do not all come from one code):"]
    lines += [f"* {label}{' (the current code)' if label == current else ''}: {', '.join(names)}"
              for label, names in groups.items()]
    return lines


def compare(cfg: ExperimentConfig, methods: Sequence[str], seeds: Sequence[int] | int, out_dir: str | Path | None = None,
            overwrite: bool = False, resume: bool = False, extra_eval: Callable[[Task], dict[str, float]] | None = None,
            progress: bool = True, keep_other_code: bool = False) -> "Any":
    """Train every method with every seed (seed-major: all methods of seed 0, then seed 1, ...) and tabulate.

    Args:
        methods: method names; ``base`` is the reference of the paired differences (needed for them).
        seeds: a count ``n`` (seeds ``train.seed .. train.seed+n-1``) or explicit seeds.
        out_dir: default ``cfg.output_dir`` (``~`` expanded); runs go to ``<out_dir>/<method>/seed<k>``. It must
            be absent, empty, or a compare directory flatpeft wrote holding nothing else.
        overwrite: replace existing runs (each one only once its new run finished). resume: keep finished runs
            and train the missing ones; refused (naming the keys, or the data files) when a setting that changes a
            run differs from a finished run's recorded config, or a data file's sha256 from the one recorded in
            its ``eval.json``. A finished run trained by other code (:mod:`~flatpeft.experiments.provenance`) is
            retrained, unless ``keep_other_code``: then it is kept and the tables name the code of every run.
            Without either, an output directory that already holds runs is refused.

    A run that diverges (:class:`RunDivergedError`) is recorded as failed (``compare_plan.json`` and the
    tables) and the comparison carries on; ``result.failed`` lists such runs.

    Returns the :class:`~flatpeft.experiments.results.CompareResult` (also written as ``results.md``,
    ``results.csv`` and ``results.png``, each replaced atomically after every finished run, so they always show
    the finished runs even if the comparison is killed). A ``KeyboardInterrupt`` writes the tables and is re-raised.
    """
    from tqdm.auto import tqdm

    from . import results as tables

    out = check_output_dir(Path(cfg.output_dir if out_dir is None else out_dir).expanduser())
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("--methods: give at least one method")
    seed_list = list(range(cfg.train.seed, cfg.train.seed + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("--seeds: give at least one seed")
    bad = [s for s in seed_list if not 0 <= s <= SEED_MAX]  # every seed is checked before the first run trains
    if bad:
        raise ValueError(f"--seeds: seed {bad[0]} is out of range: seeds are integers in 0 .. 2**32 - 1 (a count N "
                         f"runs train.seed .. train.seed+N-1 = {seed_list[0]} .. {seed_list[-1]})"
                         if isinstance(seeds, int) else f"--seeds: seed {bad[0]} is out of range: seeds are integers "
                         "in 0 .. 2**32 - 1")
    if keep_other_code and not resume:
        raise ValueError("--keep-other-code keeps finished runs of other code when resuming: use it with --resume")
    validate_config(cfg, methods)
    if "test" not in cfg.train.eval_splits and "val" not in cfg.train.eval_splits:
        raise ValueError(f"train.eval_splits: compare tabulates test accuracy (or, for a selection on validation "
                         f"data, validation accuracy), so it must include test or val (got {cfg.train.eval_splits})")
    table_metric = "accuracy" if "test" in cfg.train.eval_splits else "val_accuracy"
    plan = {(m, s): _run_config(_with_method(cfg, m), s, run_dir_for(out, m, s)) for s in seed_list for m in methods}
    foreign = _foreign_in_compare_dir(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunExistsError(f"output directory {str(out)!r} holds files flatpeft did not write ({shown}); compare "
                             "writes only into a new or empty directory or one it wrote itself: choose another "
                             "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    with dir_lock(out / _COMPARE_LOCK, f"compare directory {str(out)!r}"):
        _remove_own_tmp(out)
        existing = sorted(str(p.parent.relative_to(out)) for p in out.glob(f"*/seed*/{RUN_MANIFEST}"))
        if existing and not (overwrite or resume):
            raise RunExistsError(f"output directory {str(out)!r} already holds runs ({', '.join(existing[:4])}"
                                 f"{', ...' if len(existing) > 4 else ''}); pass --overwrite to replace them or "
                                 "--resume to keep finished runs and redo the rest")
        data = data_hashes(plan[next(iter(plan))]) if existing and not overwrite else {}
        if resume and not overwrite:
            conflicts, changed = _resume_conflicts(plan, out, data)
            if conflicts:
                raise ValueError(f"compare --resume: settings differ from the finished runs in {str(out)!r}: "
                                 + "; ".join(conflicts[:6]) + ("; ..." if len(conflicts) > 6 else "")
                                 + ". A table never mixes settings: use another --output-dir, or --overwrite to "
                                 "redo every run with the new settings")
            if changed:
                raise ValueError(f"compare --resume: data differ from those the finished runs in {str(out)!r} "
                                 "were trained on: " + "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
                                 + ". A table never mixes data: use another --output-dir, or --overwrite to redo "
                                 "every run on the current files")
        old = read_manifest(out, COMPARE_MANIFEST) or {}
        write_manifest(out, COMPARE_MANIFEST, entries=list(COMPARE_FILES),
                       methods=sorted(set(old.get("methods", [])) | set(methods)))
        save_config(absolutize_paths(cfg), out / "compare_config.yaml")  # the shared config, for the record
        failed: dict[str, dict[str, Any]] = {}
        state = {"methods": methods, "seeds": seed_list, "failed": failed}
        write_json(out / "compare_plan.json", state)

        def write_tables():
            runs = _valid_runs(plan, out, data, keep_other_code)
            return tables.collect_and_write(out, methods=methods, metric=table_metric, runs=runs, failed=failed,
                                            code=code_notes(runs))

        if existing:
            write_tables()  # fresh tables of what is there (a killed process may have finished a run after them)
        jobs = [(s, m) for s in seed_list for m in methods]
        outer = tqdm(jobs, desc="compare", unit="run", disable=not progress)
        try:
            for seed, method in outer:
                outer.set_postfix_str(f"{method} seed {seed}")
                run = run_dir_for(out, method, seed)
                if not overwrite and is_finished(run):
                    match = match_run(run, plan[method, seed], data, diff=False)
                    if match.settings_match and not match.data and (keep_other_code or match.same_code):
                        continue
                    if match.settings_match and not match.data:
                        print(f"flatpeft: note: {method}/seed{seed} was trained by other code ({code_label(match.code)}); "
                              f"retraining it ({KEEP_OTHER_CODE_HINT} keeps it)", file=sys.stderr)
                try:
                    train_run(_with_method(cfg, method), seed=seed, out_dir=run, overwrite=True,
                              extra_eval=extra_eval, progress=progress)
                except RunDivergedError as err:
                    failed[f"{method}/seed{seed}"] = {"method": method, "seed": seed, "step": err.step,
                                                      "error": str(err)}
                    write_json(out / "compare_plan.json", state)
                    print(f"flatpeft: run failed: {err}", file=sys.stderr)
                write_tables()  # tables always reflect the finished (and failed) runs
        except KeyboardInterrupt:
            outer.close()
            write_tables()
            print(f"\ninterrupted: tables of the finished runs written to {out}")
            raise
        outer.close()
        return write_tables()


def _with_method(cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """Copy of ``cfg`` running ``method`` (the shared method section as that method uses it)."""
    run = copy.deepcopy(cfg)
    run.method = method_kwargs_for(method, cfg.method)
    return run
