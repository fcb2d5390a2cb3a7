"""``flatpeft suite``: every task of a plan x methods x seeds, with resume, and one results page.

A *plan* (YAML; default ``configs/suite.yaml`` of the current directory when there is one, as in a checkout, else
the built-in plan ``suite``, see :func:`default_plan`) lists tasks; each task is an experiment config plus overrides,
the methods to run, the seeds, the metrics to report, and optional *ablations* (one method with extra
settings, paired with the task's ``base`` runs). Every task (and every ablation) is one ``compare`` directory
under ``output_dir`` and is run through :func:`flatpeft.experiments.runner.compare` with ``resume=True``, so
the machinery is compare's: paired seeds, the settings guard (a finished run with other settings is refused,
naming the keys), failed-run records, atomic tables. Running the same command again trains only what is
missing and rewrites the page.

The page (default ``docs/results.md``) is rebuilt from the runs' ``eval.json`` files after the runs: per task a
table of every reported metric (mean ± std over seeds, paired difference to ``base`` with its 95 % Student-t
interval and the verdict), a plot, the settings, and a section that states which claims of the seed papers
the numbers support, refute or cannot resolve (:data:`CLAIMS`). Wall time, machine and load come from
``suite_log.json`` (one record per task and invocation).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["SuitePlan", "SuiteTask", "Ablation", "load_plan", "run_suite", "write_page", "CLAIMS", "unit_dirs"]

DEFAULT_METHODS = ("base", "sam", "flatpo", "eflat-lora", "spider", "flatpo-lagged")


@dataclass
class Ablation:
    """One method with extra settings, paired with the task's ``base`` runs (e.g. FlatPO with ``scope=all``)."""

    name: str
    method: str
    set: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class SuiteTask:
    """One task of the plan: a config, overrides, and what to report."""

    name: str
    config: str
    set: list[str] = field(default_factory=list)
    methods: list[str] | None = None          # default: the plan's methods
    seeds: int | list[int] | None = None      # default: the plan's seeds
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])   # first = primary
    ablations: list[Ablation] = field(default_factory=list)
    groups: list[list[str]] | None = None     # split the methods over compare directories that run in parallel
    enabled: bool = True
    skip_reason: str = ""
    description: str = ""


@dataclass
class SuitePlan:
    """The whole plan (``configs/suite.yaml``)."""

    tasks: list[SuiteTask]
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int | list[int] = 10
    output_dir: str = "runs/suite"
    page: str = "docs/results.md"
    threads: int = 1
    jobs: int = 1
    notes: str = ""
    path: str = ""

    def task_methods(self, task: SuiteTask) -> list[str]:
        return list(task.methods or self.methods)

    def task_seeds(self, task: SuiteTask) -> list[int]:
        seeds = self.seeds if task.seeds is None else task.seeds
        return list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]


def _check_keys(raw: dict, cls: type, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)} - {"path"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(names))})")


def load_plan(path: str | Path) -> SuitePlan:
    """Read and check a plan file, or the built-in plan by name (``suite``); unknown keys, duplicate names, configs
    that do not load are errors."""
    from flatpeft.resources import resolve_config_path

    from .config import read_config_mapping

    raw = read_config_mapping(path)
    path = resolve_config_path(path)
    _check_keys(raw, SuitePlan, str(path))
    if not raw.get("tasks"):
        raise ValueError(f"{path}: a plan needs a non-empty 'tasks' list")
    tasks = []
    for i, t in enumerate(raw["tasks"]):
        where = f"{path}: tasks[{i}]"
        if not isinstance(t, dict) or "name" not in t or "config" not in t:
            raise ValueError(f"{where}: each task needs 'name' and 'config'")
        _check_keys(t, SuiteTask, where)
        abls = []
        for j, a in enumerate(t.get("ablations") or []):
            _check_keys(a, Ablation, f"{where}.ablations[{j}]")
            abls.append(Ablation(**a))
        tasks.append(SuiteTask(**{**t, "ablations": abls}))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: task names must be unique, got {names}")
    plan = SuitePlan(**{**raw, "tasks": tasks}, path=str(path))
    base = path.parent.parent if path.parent.name == "configs" else Path.cwd()
    for t in plan.tasks:  # configs relative to the plan's project (configs/x.yaml) or the current directory
        if not Path(t.config).is_absolute() and not Path(t.config).exists() and (base / t.config).exists():
            t.config = str(base / t.config)
    return plan


# ---- units: one compare directory each ----------------------------------------------------------
@dataclass
class Unit:
    task: SuiteTask
    name: str                 # directory name under output_dir
    methods: list[str]
    seeds: list[int]
    overrides: list[str]
    ablation: Ablation | None = None


def units(plan: SuitePlan, only: Sequence[str] | None = None) -> list[Unit]:
    """The compare directories of the plan, in order (a task's main comparison, then its ablations)."""
    out = []
    for t in plan.tasks:
        if only is not None and t.name not in only:
            continue
        if only is None and not t.enabled:
            continue
        seeds = plan.task_seeds(t)
        for name, methods in task_groups(plan, t):
            out.append(Unit(t, name, methods, seeds, list(t.set)))
        for a in t.ablations:
            out.append(Unit(t, f"{t.name}__{a.name}", [a.method], seeds, [*t.set, *a.set], a))
    return out


def task_groups(plan: SuitePlan, task: SuiteTask) -> list[tuple[str, list[str]]]:
    """``(directory name, methods)`` of a task's main comparison: one directory, or one per method group
    (``groups``; the first keeps the task's name, the others are ``<name>__g2``, ...). Seeds pair across them."""
    methods = plan.task_methods(task)
    if not task.groups:
        return [(task.name, methods)]
    grouped = [m for g in task.groups for m in g]
    if sorted(grouped) != sorted(methods) or len(set(grouped)) != len(grouped):
        raise ValueError(f"task {task.name!r}: groups must split its methods {methods} exactly, got {task.groups}")
    return [(task.name if i == 0 else f"{task.name}__g{i + 1}", list(g)) for i, g in enumerate(task.groups)]


def unit_dirs(plan: SuitePlan, output_dir: str | Path | None = None) -> dict[str, Path]:
    root = Path(output_dir or plan.output_dir).expanduser()
    return {u.name: root / u.name for u in units(plan, [t.name for t in plan.tasks])}


def _load_unit_config(unit: Unit):
    from .config import load_config

    return load_config(unit.task.config, unit.overrides)


def _run_unit(unit: Unit, out: str, threads: int, progress: bool, retries: int = 2) -> dict[str, Any]:
    """Run one compare directory with resume; returns a log record (wall time, load, failures). An error is
    retried ``retries`` times (resuming), except a settings conflict, which is final."""
    import torch

    from .runner import compare

    if threads:
        torch.set_num_threads(threads)
    start, load0 = time.time(), os.getloadavg()
    status, error, failed = "finished", "", []
    finished = lambda: len(list(Path(out).glob("*/seed*/eval.json")))  # noqa: E731 - runs done in ``out``
    before = finished()
    for attempt in range(1 + retries):
        try:
            cfg = _load_unit_config(unit)
            result = compare(cfg, unit.methods, unit.seeds, out_dir=out, resume=True, progress=progress)
            status, error, failed = "finished", "", sorted(result.failed)
            break
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one unit's error (a settings conflict, a vanished file) is
            # recorded and the others carry on; a retry resumes (finished runs are kept)
            status, error = "error", f"{type(err).__name__}: {err}"
            if "settings differ" in str(err):
                break
            print(f"suite: {unit.name}: {error}" + ("; retrying in 30 s" if attempt < retries else ""),
                  file=sys.stderr, flush=True)
            if attempt < retries:
                time.sleep(30)
    return {"unit": unit.name, "task": unit.task.name, "start": start, "end": time.time(),
            "wall_s": time.time() - start, "load_start": load0[0], "load_end": os.getloadavg()[0],
            "status": status, "error": error, "failed": failed, "pid": os.getpid(), "trained": finished() - before}


def _transformers_verbosity() -> int | None:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the suite's tasks need transformers
        return None
    return transformers.logging.get_verbosity()


def _unit_worker(args: tuple) -> dict[str, Any]:
    plan_path, unit_name, out, threads, progress, only, verbosity = args
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if verbosity is not None:  # a spawned process starts with transformers' defaults: keep the parent's (the CLI's)
        import transformers

        transformers.logging.set_verbosity(verbosity)
    plan = load_plan(plan_path)
    unit = next(u for u in units(plan, only) if u.name == unit_name)
    return _run_unit(unit, out, threads, progress)


class _LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float = 30.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        self._thread.start()

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        return self.samples


def _read_log(root: Path) -> dict[str, Any]:
    path = root / "suite_log.json"
    return json.loads(path.read_text()) if path.is_file() else {"invocations": []}


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.is_available()}


def run_suite(plan: SuitePlan, *, output_dir: str | Path | None = None, page: str | Path | None = None,
              only: Sequence[str] | None = None, jobs: int | None = None, threads: int | None = None,
              train: bool = True, progress: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Run (resume) every unit of ``plan`` and write the page; returns the page's path.

    ``only``: task names to run (also disabled ones); ``train=False`` rebuilds the page from what exists.
    ``jobs``: compare directories run in parallel processes (each with ``threads`` torch threads).
    """
    from .rundir import write_json

    _check_page_is_ours(Path(page or plan.page))  # before anything runs
    root = Path(output_dir or plan.output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    jobs = int(jobs or plan.jobs or 1)
    threads = int(threads if threads is not None else plan.threads)
    todo = units(plan, only)
    for u in todo:  # every config loads before anything runs
        _load_unit_config(u)
    log = _read_log(root)
    inv: dict[str, Any] = {"start": time.time(), "jobs": jobs, "threads": threads, "units": [],
                           "only": list(only) if only else None, "train": train, "machine": machine_info()}
    if train and todo:
        import signal

        def _terminate(signum, frame):  # a plain `kill` records the invocation like Ctrl-C does
            raise KeyboardInterrupt(f"signal {signum}")

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        sampler = _LoadSampler()
        echo(f"suite: {len(todo)} compare director{'y' if len(todo) == 1 else 'ies'} under {root} "
             f"({jobs} parallel, {threads} thread(s) each): " + ", ".join(u.name for u in todo))
        try:
            if jobs <= 1:
                for u in todo:
                    rec = _run_unit(u, str(root / u.name), threads, progress)
                    inv["units"].append(rec)
                    echo(f"suite: {u.name}: {rec['status']} in {rec['wall_s'] / 60:.1f} min")
            else:
                import concurrent.futures as cf
                import multiprocessing as mp

                with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                    verbosity = _transformers_verbosity()
                    futs = {pool.submit(_unit_worker, (plan.path, u.name, str(root / u.name), threads, progress,
                                                       list(only) if only else None, verbosity)): u for u in todo}
                    for fut in cf.as_completed(futs):
                        rec = fut.result()
                        inv["units"].append(rec)
                        echo(f"suite: {rec['unit']}: {rec['status']} in {rec['wall_s'] / 60:.1f} min")
        finally:
            samples = sampler.stop()
            inv["end"] = time.time()
            inv["load_mean"] = sum(samples) / len(samples)
            inv["load_max"] = max(samples)
            log = _read_log(root)  # another invocation (other tasks) may have written it meanwhile
            log["invocations"].append(inv)
            write_json(root / "suite_log.json", log)
    else:
        inv["end"] = time.time()
        log["invocations"].append(inv)
        write_json(root / "suite_log.json", log)
    errors = [r for r in inv["units"] if r["status"] == "error"]
    for r in errors:
        echo(f"suite: {r['unit']}: error: {r['error']}")
    from .suite_page import write_page as _write_page

    out = _write_page(plan, root, Path(page or plan.page), log)
    echo(f"suite: page written to {out}")
    return out


def write_page(plan: SuitePlan, output_dir: str | Path | None = None, page: str | Path | None = None) -> Path:
    """Rebuild the page from the runs and the log under ``output_dir``."""
    from .suite_page import write_page as _write_page

    root = Path(output_dir or plan.output_dir).expanduser()
    _check_page_is_ours(Path(page or plan.page))
    return _write_page(plan, root, Path(page or plan.page), _read_log(root))


#: The seed papers' claims and how the page tests them: (claim, task filter, metric, method a, method b).
CLAIMS: list[dict[str, str]] = [
    {"id": "flatpo-vs-sam", "paper": "FlatPO",
     "claim": "perturbing only the sharpest 5 % of the adapter tensors generalises better than perturbing all of "
              "them (SAM)", "metric": "accuracy", "a": "flatpo", "b": "sam"},
    {"id": "flatpo-vs-base", "paper": "FlatPO",
     "claim": "FlatPO improves on plain fine-tuning", "metric": "accuracy", "a": "flatpo", "b": "base"},
    {"id": "eflat-vs-base", "paper": "EFlat-LoRA / Flat-LoRA",
     "claim": "flatter LoRA (EFlat-LoRA) generalises better than plain LoRA", "metric": "accuracy",
     "a": "eflat-lora", "b": "base"},
    {"id": "spider-forgetting", "paper": "SPIDER",
     "claim": "SPIDER forgets less of the pre-fine-tuning skill than plain fine-tuning",
     "metric": "seen_classes_accuracy", "a": "spider", "b": "base"},
    {"id": "spider-downstream", "paper": "SPIDER",
     "claim": "SPIDER keeps the downstream accuracy of plain fine-tuning (trade-off, not a loss)",
     "metric": "accuracy", "a": "spider", "b": "base"},
    {"id": "flatpo-forgetting", "paper": "FlatPO",
     "claim": "FlatPO forgets less of the pre-fine-tuning skill than plain fine-tuning",
     "metric": "seen_classes_accuracy", "a": "flatpo", "b": "base"},
    {"id": "lagged-vs-flatpo", "paper": "single-pass FlatPO (flatpeft)",
     "claim": "the single-pass lagged FlatPO matches two-pass FlatPO at about the cost of one pass",
     "metric": "accuracy", "a": "flatpo-lagged", "b": "flatpo"},
]


# ---- command line ---------------------------------------------------------------------------------
def default_plan() -> str:
    """The plan ``flatpeft suite`` runs without one: ``configs/suite.yaml`` of the current directory when it exists
    (a checkout, or a project laid out like one), else the built-in plan ``suite``."""
    return "configs/suite.yaml" if Path("configs/suite.yaml").is_file() else "suite"


def _check_page_is_ours(page: Path) -> None:
    """Refuse to replace a results page flatpeft did not write (say a project's own ``docs/results.md``)."""
    if page.is_file() and "Produced by `flatpeft suite" not in page.read_text(encoding="utf-8", errors="replace"):
        raise ValueError(f"results page {str(page)!r} exists and was not written by flatpeft suite; choose another "
                         "with --page (it is never overwritten)")


def _cmd_suite(args: Any) -> int:
    plan = load_plan(args.plan or default_plan())
    only = [s.strip() for s in args.tasks.split(",") if s.strip()] if args.tasks else None
    if only:
        known = {t.name for t in plan.tasks}
        unknown = [s for s in only if s not in known]
        if unknown:
            raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)} (plan has: {', '.join(sorted(known))})")
    if args.list:
        for u in units(plan, only):
            print(f"{u.name}: {u.task.config} methods={','.join(u.methods)} seeds={len(u.seeds)} "
                  f"set={' '.join(u.overrides) or '-'}")
        for t in plan.tasks:
            if not t.enabled and not (only and t.name in only):
                print(f"{t.name}: not in the default plan ({t.skip_reason or 'disabled'})")
        return 0
    run_suite(plan, output_dir=args.output_dir, page=args.page, only=only, jobs=args.jobs, threads=args.threads,
              train=not args.page_only, progress=not getattr(args, "quiet", False) and args.progress)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``flatpeft suite`` to an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "suite", help="run every task of a plan x methods x seeds (resumable) and write the results page",
        description="Runs every task of PLAN (default: configs/suite.yaml of the current directory, else the "
                    "built-in plan 'suite') with every method and seed as one "
                    "compare directory each under the plan's output_dir, always resuming (finished runs are kept; a "
                    "finished run with other settings is refused, naming the keys), then rebuilds the results page "
                    "(docs/results.md) from the runs.")
    p.add_argument("plan", nargs="?", default=None,
                   help="suite plan YAML, or a built-in plan by name (default: configs/suite.yaml of the current "
                        "directory if there is one, else the built-in 'suite')")
    p.add_argument("--tasks", default=None, help="comma list of task names to run (default: the plan's enabled tasks)")
    p.add_argument("--jobs", type=int, default=None, help="compare directories run in parallel (default: the plan's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the plan's)")
    p.add_argument("--output-dir", default=None, help="root of the runs (default: the plan's output_dir)")
    p.add_argument("--page", default=None, help="results page to write (default: the plan's page)")
    p.add_argument("--page-only", action="store_true", help="train nothing; rebuild the page from the runs")
    p.add_argument("--list", action="store_true", help="print the plan's compare directories and exit")
    p.add_argument("--progress", action="store_true", help="progress bars of every run")
    p.set_defaults(func=_cmd_suite)
