"""``flatpeft suite``: every task of a plan x methods x seeds, with resume, and one results page.

A *plan* (YAML; default ``configs/suite.yaml`` of the current directory when there is one, as in a checkout, else
the built-in plan ``suite``, see :func:`default_plan`) lists tasks; each task is an experiment config plus overrides,
the methods to run, the seeds, the metrics to report, and optional *ablations* (one method with extra
settings, paired with the task's ``base`` runs). Every task (and every ablation) is one ``compare`` directory
under ``output_dir`` and is run through :func:`flatpeft.experiments.runner.compare` with ``resume=True``, so
the machinery is compare's: paired seeds, the settings guard (a finished run with other settings or data is
refused, naming the keys or files; one trained by other code is retrained unless ``--keep-other-code``),
failed-run records, atomic tables. Running the same command again trains only what is missing and rewrites
the page. ``--reproduce`` (:mod:`flatpeft.experiments.reproduce`) retrains a sample of the page's runs at the
current code in a scratch directory and reports the largest difference of each metric.

The page (the plan's ``page``, default ``<output_dir>/results.md``) is rebuilt from the runs' ``eval.json`` files after the runs: per task a
table of every reported metric (mean ± std over seeds, paired difference to ``base`` with its 95 % Student-t
interval and the verdict), a plot, the settings, and a section that states which claims of the seed papers
the numbers support, refute or cannot resolve (:data:`CLAIMS`). Wall time, machine and load come from
``suite_log.json`` (one record per task and invocation).

The whole plan is checked before anything trains (keys and their types, names that are plain identifiers,
every unit's config, methods and keywords, the output directory and the page, which is written only where no
file flatpeft did not write would be replaced). A unit that ends with an error or failed runs makes
:func:`run_suite` raise :class:`SuiteFailedError` after the page is written (``flatpeft suite`` exits 2); only an
error that may be transient (a ``RuntimeError`` such as CUDA out of memory) is retried.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["SuitePlan", "SuiteTask", "Ablation", "SuiteFailedError", "load_plan", "run_suite", "write_page", "CLAIMS",
           "unit_dirs", "page_path"]

from .plan import (CLAIMS, DEFAULT_METHODS, Ablation, FractionCurve, Selection, SuitePlan, SuiteTask,  # noqa: F401
                   Tradeoff, Unit, grid_points, load_plan, page_path, selection_units, task_groups, unit_config,
                   unit_dirs, units)

def _check_unit(unit: Unit) -> None:
    """Every check a unit's ``compare`` runs before training, without training: the config and its overrides
    load, every method name and keyword is known, the task's config checks pass, the test split is evaluated.
    Raises ``ValueError`` naming the unit."""
    from .runner import validate_config

    try:
        cfg = unit_config(unit)
        validate_config(cfg, unit.methods)
        if unit.phase == "select":
            if cfg.train.eval_splits != ["val"]:
                raise ValueError(f"train.eval_splits: a selection unit evaluates only the validation split, got "
                                 f"{cfg.train.eval_splits}")
        elif "test" not in cfg.train.eval_splits:
            raise ValueError(f"train.eval_splits: the suite tabulates the test split, so it must include test "
                             f"(got {cfg.train.eval_splits})")
    except ValueError as err:
        raise ValueError(f"suite unit {unit.name!r} (task config {unit.task.config}): {err}") from None


class SuiteFailedError(ValueError):
    """A unit of the suite ended with an error or with failed runs (the page is written before this is raised)."""


def _transient(err: BaseException) -> bool:
    """Whether an error may go away on a retry (a CUDA out-of-memory error while other units share the device);
    a configuration or data error (``ValueError``), a missing asset or a file-system error never does."""
    from flatpeft.assets import AssetMissingError

    return isinstance(err, RuntimeError) and not isinstance(err, AssetMissingError)


def _run_unit(unit: Unit, out: str, threads: int, progress: bool, retries: int = 1,
              keep_other_code: bool = False) -> dict[str, Any]:
    """Run one compare directory with resume; returns a log record (wall time, load, failures). Only a
    :func:`_transient` error is retried (``retries`` times, resuming); any other error (a settings or data
    conflict among them) is final at once. ``keep_other_code``: keep finished runs of other code (compare's flag)."""
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
            cfg = unit_config(unit)
            result = compare(cfg, unit.methods, unit.seeds, out_dir=out, resume=True, progress=progress,
                             keep_other_code=keep_other_code)
            failed = sorted(result.failed)
            status, error = ("failed runs", f"{len(failed)} run(s) failed: {', '.join(failed)}") if failed \
                else ("finished", "")
            break
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one unit's error (a settings conflict, a vanished file) is
            # recorded and the others carry on; the suite exits non-zero at the end
            status, error = "error", f"{type(err).__name__}: {err}"
            retry = _transient(err) and attempt < retries
            print(f"suite: {unit.name}: {error}" + ("; retrying in 30 s" if retry else ""),
                  file=sys.stderr, flush=True)
            if not retry:
                break
            time.sleep(30)
    return {"unit": unit.name, "task": unit.task.name, "phase": unit.phase, "start": start, "end": time.time(),
            "wall_s": time.time() - start, "load_start": load0[0], "load_end": os.getloadavg()[0],
            "status": status, "error": error, "failed": failed, "pid": os.getpid(), "trained": finished() - before}


def _run_on_submitit(plan: SuitePlan, todo: list[Unit], root: Path, threads: int, progress: bool,
                     only: Sequence[str] | None, keep_other_code: bool, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every unit as one job of `submitit <https://github.com/facebookincubator/submitit>`_ and return their
    log records (in the plan's order).

    ``options`` go to ``submitit.AutoExecutor`` and its ``update_parameters``: ``cluster`` (``"slurm"``,
    ``"local"``, or absent: Slurm when it is there, else local processes), ``folder`` (job logs and pickles;
    default ``<output_dir>/.submitit``), and any executor parameter (``timeout_min``, ``gpus_per_node``,
    ``cpus_per_task``, ``slurm_partition``, ``slurm_array_parallelism``, ...). A unit is one job: its runs go one
    after another on that job's device, so ``gpus_per_node=1`` gives one GPU per compare directory. The jobs
    resume like local units (finished runs are kept), so a pre-empted or failed job is simply submitted again.
    """
    from flatpeft._extras import require

    require("cluster", part="flatpeft suite --executor submitit")
    import submitit

    folder = Path(options.pop("folder", root / ".submitit")).expanduser()
    cluster = options.pop("cluster", None)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    ex.update_parameters(name="flatpeft-suite", **options)
    verbosity = _transformers_verbosity()
    jobs = [ex.submit(_unit_worker, _worker_args(plan, u, root, threads, progress, only, verbosity, keep_other_code))
            for u in todo]
    return [job.result() for job in jobs]


def _transformers_verbosity() -> int | None:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the suite's tasks need transformers
        return None
    return transformers.logging.get_verbosity()


def _worker_args(plan: SuitePlan, unit: Unit, root: Path, threads: int, progress: bool,
                 only: Sequence[str] | None, verbosity: int | None, keep_other_code: bool) -> tuple:
    """The picklable arguments of :func:`_unit_worker` for ``unit`` (a process pool or a submitit job): the unit
    itself (its settings are resolved, selection included), so a worker never re-derives it."""
    return (unit, str(root / unit.name), threads, progress, verbosity, keep_other_code)


def _unit_worker(args: tuple) -> dict[str, Any]:
    unit, out, threads, progress, verbosity, keep_other_code = args
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if verbosity is not None:  # a spawned process starts with transformers' defaults: keep the parent's (the CLI's)
        import transformers

        transformers.logging.set_verbosity(verbosity)
    return _run_unit(unit, out, threads, progress, keep_other_code=keep_other_code)


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
    """``root/suite_log.json``; a file that is not the suite's log (not JSON, no ``invocations`` list) is an
    error naming it (it is never overwritten)."""
    path = root / "suite_log.json"
    if not path.exists():
        return {"invocations": []}
    try:
        log = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable suite log ({type(err).__name__}: {err}); move it away (the "
                         "page then counts no wall time for earlier invocations)") from None
    if not isinstance(log, dict) or not isinstance(log.get("invocations"), list) or \
            not all(isinstance(i, dict) for i in log["invocations"]):
        raise ValueError(f"{path}: not a suite log (expected an object with an 'invocations' list); move it away")
    return log


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
              train: bool = True, progress: bool = False, echo: Callable[[str], None] = print,
              keep_other_code: bool = False, executor: str = "local",
              executor_options: dict[str, Any] | None = None) -> Path:
    """Run (resume) every unit of ``plan`` and write the page; returns the page's path.

    ``executor``: ``"local"`` (this machine: one unit after another, or ``jobs`` parallel processes) or
    ``"submitit"``: every compare directory is one job of submitit (Slurm on a cluster, subprocesses with
    ``executor_options={"cluster": "local"}``), see :func:`_run_on_submitit`.

    ``only``: task names to run (also disabled ones); ``train=False`` rebuilds the page from what exists.
    ``jobs``: compare directories run in parallel processes (each with ``threads`` torch threads).
    ``keep_other_code``: keep finished runs trained by other code (the page names the code of every table)
    instead of retraining them.
    """
    from .rundir import check_output_dir, write_json
    from .suite_page import check_page

    root = Path(output_dir or plan.output_dir).expanduser()
    check_output_dir(root, "output_dir of the suite")
    page_file = page_path(plan, output_dir, page)
    jobs = int(jobs or plan.jobs or 1)
    threads = int(threads if threads is not None else plan.threads)
    todo = units(plan, only, phases=["select"])
    check_page(page_file, [t.name for t in plan.tasks])
    for u in [*todo, *units(plan, only, _first_points(plan), phases=["test", "fraction"])]:
        _check_unit(u)  # the whole plan is checked before anything trains (a selection's first point stands in)
    root.mkdir(parents=True, exist_ok=True)
    log = _read_log(root)
    inv: dict[str, Any] = {"start": time.time(), "jobs": jobs, "threads": threads, "units": [],
                           "only": list(only) if only else None, "train": train, "machine": machine_info()}
    if train and (todo or units(plan, only)):
        import signal

        def _terminate(signum, frame):  # a plain `kill` records the invocation like Ctrl-C does
            raise KeyboardInterrupt(f"signal {signum}")

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        sampler = _LoadSampler()
        run = functools.partial(_run_units, plan, root=root, jobs=jobs, threads=threads, progress=progress, only=only,
                                keep_other_code=keep_other_code, executor=executor,
                                executor_options=executor_options, echo=echo, records=inv["units"])
        try:
            if todo:  # 1. the selections on validation data
                echo(f"suite: selection on validation data: {len(todo)} compare directories under {root}")
                run(todo)
            from .evidence import selected_settings

            chosen, missing = selected_settings(plan, root, only)
            rest = units(plan, only, chosen, phases=["test", "fraction"])
            for u in [u for u in rest if u.pending]:
                inv["units"].append({"unit": u.name, "task": u.task.name, "start": time.time(), "end": time.time(),
                                     "wall_s": 0.0, "status": "error", "failed": [], "trained": 0,
                                     "error": f"not run: the selection it needs did not finish "
                                              f"({'; '.join(missing.get(u.task.name, []))})"})
            todo = [u for u in rest if not u.pending]
            for u in todo:
                _check_unit(u)
            # 2. the tables (each method at its selected setting), ablations and fraction curves
            run(todo)
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
    # a grid point whose run diverged is a result of the selection (that point is never chosen, the page says so)
    errors = [r for r in inv["units"] if r["status"] != "finished"
              and not (r.get("phase") == "select" and r["status"] == "failed runs")]
    for r in errors:
        echo(f"suite: {r['unit']}: error: {r['error']}")
    from .suite_page import write_page as _write_page

    out = _write_page(plan, root, page_file, log)
    echo(f"suite: page written to {out}")
    if errors:
        raise SuiteFailedError(f"suite: {len(errors)} of {len(inv['units'])} compare director"
                               f"{'y' if len(inv['units']) == 1 else 'ies'} did not finish: "
                               + "; ".join(f"{r['unit']} ({r['error']})" for r in errors))
    return out


def _first_points(plan: SuitePlan) -> dict[str, dict[str, list[str]]]:
    """Stand-in selections for checking a plan before anything trains: every grid's first point."""
    return {t.name: {m: grid_points(keys)[0][1] for m, keys in t.select.grid.items()}
            for t in plan.tasks if t.select is not None}


def _run_units(plan: SuitePlan, todo: list[Unit], *, root: Path, jobs: int, threads: int, progress: bool,
               only: Sequence[str] | None, keep_other_code: bool, executor: str,
               executor_options: dict[str, Any] | None, echo: Callable[[str], None],
               records: list[dict[str, Any]]) -> None:
    """Run ``todo`` here (one after another, or ``jobs`` spawned processes) or as submitit jobs, appending each
    unit's log record to ``records`` as it finishes."""
    if not todo:
        return
    echo(f"suite: {len(todo)} compare director{'y' if len(todo) == 1 else 'ies'} under {root} "
         f"({jobs} parallel, {threads} thread(s) each): " + ", ".join(u.name for u in todo))

    def done(rec: dict[str, Any]) -> None:
        records.append(rec)
        echo(f"suite: {rec['unit']}: {rec['status']} in {rec['wall_s'] / 60:.1f} min")

    if executor == "submitit":
        for rec in _run_on_submitit(plan, todo, root, threads, progress, only, keep_other_code,
                                    dict(executor_options or {})):
            done(rec)
    elif jobs <= 1:
        for u in todo:
            done(_run_unit(u, str(root / u.name), threads, progress, keep_other_code=keep_other_code))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            verbosity = _transformers_verbosity()
            futs = [pool.submit(_unit_worker, _worker_args(plan, u, root, threads, progress, only, verbosity,
                                                           keep_other_code)) for u in todo]
            for fut in cf.as_completed(futs):
                done(fut.result())


def write_page(plan: SuitePlan, output_dir: str | Path | None = None, page: str | Path | None = None) -> Path:
    """Rebuild the page from the runs and the log under ``output_dir``."""
    from .suite_page import write_page as _write_page

    root = Path(output_dir or plan.output_dir).expanduser()
    return _write_page(plan, root, page_path(plan, output_dir, page), _read_log(root))


# ---- command line ---------------------------------------------------------------------------------
def default_plan() -> str:
    """The plan ``flatpeft suite`` runs without one: ``configs/suite.yaml`` of the current directory when it exists
    (a checkout, or a project laid out like one), else the built-in plan ``suite``."""
    return "configs/suite.yaml" if Path("configs/suite.yaml").is_file() else "suite"


def _cmd_suite(args: Any) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer (torch threads per process), got {args.threads}")
    plan = load_plan(args.plan or default_plan())
    only = [s.strip() for s in args.tasks.split(",") if s.strip()] if args.tasks else None
    if only:
        known = {t.name for t in plan.tasks}
        unknown = [s for s in only if s not in known]
        if unknown:
            raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)} (plan has: {', '.join(sorted(known))})")
    if args.reproduce:
        from .reproduce import reproduce

        report = reproduce(plan, output_dir=args.output_dir, only=only, sample=args.sample, scratch=args.scratch,
                           threads=args.threads, tolerance=args.tolerance, progress=args.progress)
        return 0 if report.passed else 1
    if args.list:
        from .evidence import selected_settings

        root = Path(args.output_dir or plan.output_dir).expanduser()
        for u in units(plan, only, selected_settings(plan, root, only)[0] if root.is_dir() else None):
            print(f"{u.name}: {u.task.config} methods={','.join(u.methods)} seeds={len(u.seeds)} "
                  f"set={' '.join(u.overrides) or '-'}" + (" (+ the selected setting, after selection)"
                                                           if u.pending else ""))
        for t in plan.tasks:
            if not t.enabled and not (only and t.name in only):
                print(f"{t.name}: not in the default plan ({t.skip_reason or 'disabled'})")
        return 0
    run_suite(plan, output_dir=args.output_dir, page=args.page, only=only, jobs=args.jobs, threads=args.threads,
              train=not args.page_only, progress=not getattr(args, "quiet", False) and args.progress,
              keep_other_code=args.keep_other_code, executor=args.executor,
              executor_options=_executor_options(args.executor_option, args.executor))
    return 0


def _executor_options(items: Sequence[str], executor: str) -> dict[str, Any]:
    """``--executor-option KEY=VALUE`` pairs as a mapping (values read as YAML: ``timeout_min=120`` is a number)."""
    from .config import safe_load_yaml

    if items and executor != "submitit":
        raise ValueError("--executor-option applies to --executor submitit")
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--executor-option: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = safe_load_yaml(value) if value.strip() else ""
    return out


def register_cli(subparsers: Any) -> None:
    """Add ``flatpeft suite`` to an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "suite", help="run every task of a plan x methods x seeds (resumable) and write the results page",
        description="Runs every task of PLAN (default: configs/suite.yaml of the current directory, else the "
                    "built-in plan 'suite') with every method and seed as one "
                    "compare directory each under the plan's output_dir, always resuming (finished runs are kept; a "
                    "finished run with other settings or data is refused, naming the keys or files; one trained by "
                    "other code is retrained unless --keep-other-code), then rebuilds the results page (the plan's "
                    "page, default <output_dir>/results.md) from the runs. Exits with status 2 when a compare "
                    "directory ended with an error or failed runs. --reproduce retrains a sample of the page's runs "
                    "at the current code and reports the largest difference of each metric.")
    p.add_argument("plan", nargs="?", default=None,
                   help="suite plan YAML, or a built-in plan by name (default: configs/suite.yaml of the current "
                        "directory if there is one, else the built-in 'suite')")
    p.add_argument("--tasks", default=None, help="comma list of task names to run (default: the plan's enabled tasks)")
    p.add_argument("--jobs", type=int, default=None, help="compare directories run in parallel (default: the plan's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the plan's)")
    p.add_argument("--output-dir", default=None, help="root of the runs (default: the plan's output_dir)")
    p.add_argument("--page", default=None,
                   help="results page to write (default: the plan's page, else <output_dir>/results.md)")
    p.add_argument("--page-only", action="store_true", help="train nothing; rebuild the page from the runs")
    p.add_argument("--list", action="store_true", help="print the plan's compare directories and exit")
    p.add_argument("--progress", action="store_true", help="progress bars of every run")
    p.add_argument("--executor", choices=("local", "submitit"), default="local",
                   help="where the compare directories run: local (this machine, --jobs processes) or submitit "
                        "(one job per compare directory: Slurm on a cluster; docs/cli.md, 'On a cluster')")
    p.add_argument("--executor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit executor option, repeatable (cluster=local|slurm, timeout_min=120, gpus_per_node=1, "
                        "slurm_partition=gpu, folder=DIR); values are read as YAML")
    p.add_argument("--keep-other-code", action="store_true",
                   help="keep finished runs trained by other code (the page names the code behind every table) "
                        "instead of retraining them")
    p.add_argument("--reproduce", action="store_true",
                   help="train nothing under output_dir: retrain a sample of the page's runs at the current code "
                        "in a scratch directory and report the largest difference of each metric; exit 1 when one "
                        "differs beyond --tolerance")
    p.add_argument("--sample", type=int, default=1,
                   help="with --reproduce: seeds retrained per task and method (default 1, the lowest seeds)")
    p.add_argument("--scratch", default=None,
                   help="with --reproduce: directory for the retrained runs (absent or empty; kept). Default: a "
                        "temporary directory, removed afterwards")
    p.add_argument("--tolerance", type=float, default=None,
                   help="with --reproduce: largest allowed |difference| of a metric, relative to max(1, |value|) "
                        "(default 1e-6: float noise; a bit-for-bit rerun gives 0)")
    p.set_defaults(func=_cmd_suite)
