"""``flatpeft analyze`` and ``flatpeft preference``: thin argparse layers over typed functions.

The CLI (``flatpeft.cli``) calls :func:`register_cli` with its sub-parsers; each sub-command sets
``func`` to a function taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .pipeline import AnalysisSettings, SharpnessReport, analyze_model, report_files, write_report

__all__ = ["register_cli", "analyze_run", "load_run_task", "cmd_analyze", "cmd_preference"]


def load_run_task(run_dir: str | Path) -> Any:
    """Rebuild the task of a finished run: ``config.yaml`` of ``run_dir`` + ``Task.load`` (trained weights).

    The config is read as ``flatpeft eval`` reads it (:func:`~flatpeft.experiments.runner.load_run_config`): a
    recorded config that lacks keys is refused, never filled with defaults."""
    from flatpeft.experiments.runner import load_run_config
    from flatpeft.experiments.tasks import get_task

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)  # the runner writes the run seed into train.seed
    task_cls = get_task(cfg.task)
    task_cls.check_config(cfg)
    return task_cls.load(run_dir, cfg)


def analyze_run(
    run_dir: str | Path, *, batches: int = 1, settings: AnalysisSettings | None = None,
    echo: Any = None,
) -> SharpnessReport:
    """Analyse the adapter of ``run_dir`` on ``batches`` training batches; write ``sharpness.json`` and plots there.

    The files are first registered in the run's manifest (:func:`~flatpeft.experiments.rundir.register_entries`),
    under the run's lock: they belong to the run, so ``train --overwrite`` replaces them with it and
    ``compare --resume`` does not take them for files of the user."""
    from flatpeft.experiments.rundir import register_entries, run_lock

    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"--batches must be a positive integer, got {batches!r}")
    task = load_run_task(run_dir)
    report = analyze_model(task.model, task.loss, task.analysis_batches(batches), settings or AnalysisSettings(),
                           echo=echo)
    report = dataclasses.replace(report, extra={"run_dir": str(Path(run_dir).resolve()), "task": task.cfg.task,
                                                "model": task.cfg.model, "method": dict(task.cfg.method)})
    with run_lock(Path(run_dir)):
        register_entries(run_dir, report_files(report))
        write_report(report, run_dir, title=f"{task.cfg.method.get('name', '')} ({Path(run_dir).name})")
    return report


#: ``--full``: the thorough (slow) settings: 4 batches, 3 eigenvalues, 32 Hutchinson probes, 5 ascent steps,
#: 21-point 1-D and 11x11 2-D landscapes (over 15 minutes for MiniLM on 2 CPU cores).
FULL = {"batches": 4, "top_k": 3, "hutchinson_samples": 32, "ascent_steps": 5, "points_1d": 21, "points_2d": 11}


def cmd_analyze(args: argparse.Namespace) -> int:
    """``flatpeft analyze RUN_DIR``."""
    import sys
    import time

    if args.full:
        for key, value in FULL.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    d = AnalysisSettings()
    for key, default in (("batches", 1), ("top_k", d.top_k), ("hutchinson_samples", d.hutchinson_samples),
                         ("ascent_steps", d.ascent_steps), ("points_1d", d.landscape_points_1d),
                         ("points_2d", d.landscape_points_2d)):
        if getattr(args, key) is None:
            setattr(args, key, default)
    settings = AnalysisSettings(
        top_k=args.top_k,
        hutchinson_samples=args.hutchinson_samples,
        rho=args.rho,
        adaptive_rho=args.adaptive_rho,
        ascent_steps=args.ascent_steps,
        landscape_radius=args.landscape_radius,
        landscape_points_1d=args.points_1d,
        landscape_points_2d=args.points_2d,
        seed=args.seed,
        progress=not (args.no_progress or getattr(args, "quiet", False)),
    )
    start = time.perf_counter()
    report = analyze_run(args.run_dir, batches=args.batches, settings=settings,
                         echo=lambda text: print(text, file=sys.stderr, flush=True))
    print(f"wrote {Path(args.run_dir) / 'sharpness.json'} ({time.perf_counter() - start:.0f} s)")
    if report.top_eigenvalues:
        print(f"top eigenvalues: {', '.join(f'{v:.4g}' for v in report.top_eigenvalues)}")
    if settings.hutchinson_samples:
        print(f"trace (Hutchinson): {report.trace:.4g} ± {report.trace_std_error:.2g}")
    print("share of sharpness (grad_sq) in the sharpest 5 %: "
          f"tensors {report.share_at_5_percent['grad_sq/tensor']:.3f}, "
          f"elements {report.share_at_5_percent['grad_sq/element']:.3f}")
    print(f"worst-case sharpness rho={settings.rho}: {report.worst_case['sharpness']:.4g} "
          f"(SAM direction {report.worst_case['sam_sharpness']:.4g})")
    return 0


def cmd_preference(args: argparse.Namespace) -> int:
    """``flatpeft preference CONFIG``."""
    from flatpeft.experiments import load_config

    from .preference import parse_fractions, run_preference

    cfg = load_config(args.config, args.set or [])
    out = args.output_dir or str(Path(cfg.output_dir) / "preference")
    result = run_preference(
        cfg,
        fractions=parse_fractions(args.fractions),
        seeds=args.seeds,
        out_dir=out,
        overwrite=args.overwrite,
        resume=args.resume,
        keep_other_code=args.keep_other_code,
        eig_batches=args.eig_batches,
        eig_ncv=args.eig_ncv,
        progress=not getattr(args, "quiet", False),
    )
    print((Path(out) / "preference.md").read_text())
    print(f"wrote {out}/preference.md, preference.csv, preference_runs.csv, preference.png "
          f"({result.wall_seconds:.0f} s)")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``analyze`` and ``preference`` sub-commands to an argparse sub-parser collection."""
    d = AnalysisSettings()
    p = subparsers.add_parser(
        "analyze",
        help="sharpness analysis of a trained run (Hessian spectrum, trace, concentration, landscapes)",
        description="Loads RUN_DIR (config.yaml + adapter), computes top Hessian eigenvalues (scipy eigsh), "
        "Hutchinson trace/diagonal, per-tensor scores, concentration curves, worst-case sharpness and "
        "filter-normalised loss slices on the training data; writes sharpness.json, landscape_1d.png, "
        "landscape_2d.png and concentration.png into RUN_DIR.",
    )
    p.add_argument("run_dir", help="run directory written by `flatpeft train`")
    p.add_argument("--batches", type=int, default=None, help="training batches the loss is averaged over (default 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"top Hessian eigenvalues, ~20 HVPs each (default {d.top_k}: skipped)")
    p.add_argument("--hutchinson-samples", type=int, default=None,
                   help=f"Rademacher probes of the Hessian trace, one HVP each (default {d.hutchinson_samples}: skipped)")
    p.add_argument("--full", action="store_true",
                   help="thorough settings for the options not given: --batches 4 --top-k 3 --hutchinson-samples 32 "
                        "--ascent-steps 5 --points-1d 21 --points-2d 11 (over 15 min for MiniLM on 2 CPU cores)")
    p.add_argument("--rho", type=float, default=d.rho, help=f"SAM-ball radius (default {d.rho})")
    p.add_argument("--adaptive-rho", type=float, default=d.adaptive_rho,
                   help=f"ASAM-ball radius (default {d.adaptive_rho})")
    p.add_argument("--ascent-steps", type=int, default=None,
                   help=f"projected ascent steps of the worst-case estimate (default {d.ascent_steps})")
    p.add_argument("--landscape-radius", type=float, default=d.landscape_radius,
                   help=f"half-width of the landscape grids (default {d.landscape_radius})")
    p.add_argument("--points-1d", type=int, default=None,
                   help=f"points of the 1-D slice (default {d.landscape_points_1d}; 0 skips it)")
    p.add_argument("--points-2d", type=int, default=None,
                   help=f"points per axis of the 2-D slice (default {d.landscape_points_2d}; 0 skips it)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of probes, start vectors and directions")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_analyze)

    q = subparsers.add_parser(
        "preference",
        help="FlatPO flatness-preference experiment: top-f vs random-f perturbation, plus base",
        description="For each fraction f trains flatpo with selection=topk and selection=random, plus base, over "
        "seeds 0..N-1; reports test accuracy, generalisation gap and final top Hessian eigenvalue "
        "(preference.md, preference.csv, preference.png).",
    )
    q.add_argument("config", help="experiment YAML (its method.rho is kept)")
    q.add_argument("--fractions", default="0.01,0.05,0.1,0.25,0.5,1.0",
                   help="comma-separated fractions in (0, 1] (default 0.01,0.05,0.1,0.25,0.5,1.0)")
    q.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.steps=30 (repeatable)")
    q.add_argument("--output-dir", default=None, help="output directory (default <output_dir>/preference)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--resume", action="store_true",
                   help="reuse finished runs in the output directory (same settings, data and code) and train only "
                        "the missing ones (other settings or data are refused; runs of other code are retrained)")
    q.add_argument("--keep-other-code", action="store_true",
                   help="with --resume: keep finished runs trained by other code (the table names the code of "
                        "every run) instead of retraining them")
    q.add_argument("--eig-batches", type=int, default=1,
                   help="training batches for the final top-eigenvalue measurement (default 1)")
    q.add_argument("--eig-ncv", type=int, default=12,
                   help="Lanczos basis size of eigsh for that eigenvalue (about this many HVPs per restart; default 12)")
    q.set_defaults(func=cmd_preference)
