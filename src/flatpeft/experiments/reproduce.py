"""``flatpeft suite PLAN --reproduce``: retrain a sample of the page's runs at the current code and compare.

For every compare directory of the plan (a task's main comparison, each ablation) and every method, the
lowest ``sample`` seeds that have a finished run with the planned settings and the current data (the runs the
page shows) are trained again, at the current code, with the plan's thread count, into a scratch directory.
Every metric of the new ``eval.json`` is compared with the recorded one (timings excepted: ``time_per_step``
and every ``*_s`` / ``*_seconds`` entry); the report gives the largest absolute difference of each metric and
the run it came from, and the code that recorded the runs.

Tolerance: a metric passes when ``|recorded - reproduced| <= tolerance * max(1, |recorded|, |reproduced|)``,
default :data:`DEFAULT_TOLERANCE` (1e-6). A rerun on the same machine with the same thread count and code is
bit for bit (difference 0: ``eval.json`` stores Python floats, which round-trip exactly); 1e-6 only absorbs
float noise of a metric computed in another order, far below one flipped prediction (an accuracy step is
1/n, 1e-3 for 1000 test examples). A metric beyond it, a metric present in only one of the two, or a run that
now fails makes the check fail (``flatpeft suite --reproduce`` exits with 1).
"""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["DEFAULT_TOLERANCE", "ReproduceReport", "sample_runs", "metric_differences", "reproduce"]

#: Default tolerance of ``--reproduce`` (relative to max(1, |value|)).
DEFAULT_TOLERANCE = 1e-6


def _is_timing(key: str) -> bool:
    """Wall-clock entries of ``eval.json`` (never reproducible)."""
    return key == "time_per_step" or key.endswith("_s") or key.endswith("_seconds")


def _numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The numeric entries of an ``eval.json`` (``None`` for a stored non-finite value), timings excepted."""
    return {k: (None if v is None else float(v)) for k, v in metrics.items()
            if (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))) and not _is_timing(k)}


def metric_differences(recorded: dict[str, Any], reproduced: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """``({metric: |difference|}, problems)`` of two ``eval.json`` dicts. A metric in only one of them, a
    non-finite value on one side only, or differing ``data_sha256`` is a problem (difference ``inf``)."""
    a, b = _numbers(recorded), _numbers(reproduced)
    diffs: dict[str, float] = {}
    problems: list[str] = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            problems.append(f"{key} only in the {'recorded' if key in a else 'reproduced'} eval.json")
            diffs[key] = math.inf
        elif a[key] is None or b[key] is None:
            diffs[key] = 0.0 if a[key] is None and b[key] is None else math.inf
        else:
            diffs[key] = abs(a[key] - b[key])
    if recorded.get("data_sha256") != reproduced.get("data_sha256"):
        problems.append("data_sha256 differ (the run was trained on other data files)")
    return diffs, problems


@dataclass
class ReproduceReport:
    """What ``--reproduce`` found: per metric the largest difference, the run and both values."""

    tolerance: float
    scratch: str
    runs: list[str] = field(default_factory=list)
    largest: dict[str, tuple[float, str, Any, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    recorded_code: dict[str, list[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every metric of every sampled run within the tolerance, and no run failed."""
        return bool(self.runs) and not self.failures


def sample_runs(plan: Any, root: Path, only: Sequence[str] | None, sample: int) -> list[tuple[Any, Any, str, int, Path]]:
    """``(unit, config, method, seed, run dir)`` of the lowest ``sample`` seeds per compare directory and method
    among the runs the page shows (finished, planned settings, current data; any code)."""
    from .evidence import selected_settings
    from .runner import _run_config, _valid_runs, _with_method, run_dir_for
    from .plan import unit_config, units

    out = []
    chosen = selected_settings(plan, root, only)[0]
    for unit in units(plan, only, chosen, phases=["test"]):  # the page's tables (not the validation grid)
        if unit.pending:
            continue
        d = root / unit.name
        if not d.is_dir():
            continue
        cfg = unit_config(unit)
        planned = {(m, s): _run_config(_with_method(cfg, m), s, run_dir_for(d, m, s))
                   for s in unit.seeds for m in unit.methods}
        valid = _valid_runs(planned, d, keep_other_code=True, strict_data=False)
        for method in unit.methods:
            seeds = sorted(s for m, s, _ in valid if m == method)[:sample]
            out += [(unit, cfg, method, s, run_dir_for(d, method, s)) for s in seeds]
    return out


def _scratch_dir(scratch: str | Path | None) -> tuple[Path, bool]:
    """The scratch directory and whether it is a temporary one to remove; a given one must be absent or empty."""
    if scratch is None:
        return Path(tempfile.mkdtemp(prefix="flatpeft-reproduce-")), True
    path = Path(scratch).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"--scratch: {str(path)!r} exists and is not an empty directory; the reproduced runs go "
                         "into a new or empty one")
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def reproduce(plan: Any, *, output_dir: str | Path | None = None, only: Sequence[str] | None = None,
              sample: int = 1, scratch: str | Path | None = None, threads: int | None = None,
              tolerance: float | None = None, progress: bool = False,
              echo: Callable[[str], None] = print) -> ReproduceReport:
    """Retrain ``sample`` seeds per compare directory and method of ``plan`` (the runs under ``output_dir``,
    default the plan's) at the current code into ``scratch`` and compare every metric (module docstring).
    Prints the report through ``echo`` and returns it; nothing under ``output_dir`` is written."""
    import torch

    from .provenance import code_label, code_record, group_by_code
    from .runner import RunDivergedError, _read_eval, _with_method, run_code, train_run

    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"--sample must be a positive integer, got {sample!r}")
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    if not tolerance >= 0:
        raise ValueError(f"--tolerance must be a number >= 0, got {tolerance!r}")
    root = Path(output_dir or plan.output_dir).expanduser()
    todo = sample_runs(plan, root, only, sample)
    if not todo:
        raise ValueError(f"--reproduce: no finished run of the plan under {str(root)!r} to reproduce")
    threads = int(threads if threads is not None else plan.threads)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    where, temporary = _scratch_dir(scratch)
    report = ReproduceReport(tolerance=tolerance, scratch=str(where))
    current = code_label(code_record())
    echo(f"reproduce: {len(todo)} run(s) of {len({u.name for u, *_ in todo})} compare director"
         f"{'y' if len({u.name for u, *_ in todo}) == 1 else 'ies'} under {root} ({sample} seed(s) per method) "
         f"retrained at the current code ({current}), {torch.get_num_threads()} torch thread(s), in {where}")
    try:
        names = []
        for unit, cfg, method, seed, run in todo:
            name = f"{unit.name}/{method}/seed{seed}"
            names.append((name, run_code(run)))
            try:
                new = train_run(_with_method(cfg, method), seed=seed, out_dir=where / unit.name / method / f"seed{seed}",
                                progress=progress)
            except RunDivergedError as err:
                report.failures.append(f"{name}: the rerun failed ({err})")
                continue
            report.runs.append(name)
            recorded = _read_eval(run)
            diffs, problems = metric_differences(recorded, new)
            report.failures += [f"{name}: {p}" for p in problems]
            for key, diff in diffs.items():
                if key not in report.largest or diff > report.largest[key][0]:
                    report.largest[key] = (diff, name, recorded.get(key), new.get(key))
                a, b = recorded.get(key), new.get(key)
                scale = max(1.0, *(abs(float(v)) for v in (a, b) if isinstance(v, (int, float)) and math.isfinite(v)))
                if not diff <= tolerance * scale:
                    report.failures.append(f"{name}: {key} recorded {a!r}, reproduced {b!r} (difference {diff:.3g})")
        report.recorded_code = group_by_code(names)
    finally:
        torch.set_num_threads(old_threads)
        if temporary:
            shutil.rmtree(where, ignore_errors=True)
    _echo_report(report, current, echo)
    return report


def _echo_report(report: ReproduceReport, current: str, echo: Callable[[str], None]) -> None:
    """Print the recorded code, the largest difference per metric and the verdict."""
    for label, names in report.recorded_code.items():
        note = " (the current code)" if label == current else " (not the current code: a difference may be the code's)"
        echo(f"reproduce: recorded by {label}{note}: {len(names)} run(s)")
    echo("| metric | largest |difference| | run | recorded | reproduced |")
    echo("|---|---|---|---|---|")
    for key, (diff, name, a, b) in sorted(report.largest.items()):
        echo(f"| {key} | {diff:.3g} | {name} | {a!r} | {b!r} |")
    if report.passed:
        echo(f"reproduce: passed: every metric of {len(report.runs)} run(s) within {report.tolerance:g} "
             "(relative to max(1, |value|))")
    else:
        echo(f"reproduce: FAILED: {len(report.failures)} difference(s) beyond {report.tolerance:g} or failed "
             "run(s): " + "; ".join(report.failures[:10]) + ("; ..." if len(report.failures) > 10 else ""))
        print("flatpeft: error: the reproduction check failed (see above)", file=sys.stderr)
