"""The FlatPO "flatness preference" experiment: perturb the sharpest fraction f of tensors vs a random f.

For each fraction ``f`` the experiment trains ``flatpo`` with ``selection="topk"`` (the top ``max(1,
floor(f n))`` tensors by gradient norm, recomputed every step) and its ablation ``selection="random"`` (the same
number of tensors drawn at random each step), plus ``base`` (no perturbation), over seeds ``0..n-1``; every arm
of one seed shares initialisation, k-shot sample and batch order (runner contract). Each arm is one ``compare``
directory (resume, overwrite and the settings / data / code guards are compare's). After training, a hook
measures the top Hessian eigenvalue of the training loss on a few analysis batches (scipy eigsh with a small
Lanczos basis, trainable tensors only, eval mode); the training-set accuracy comes from the runner's ``train``
evaluation split.

Reported per arm (mean +- std over seeds): test accuracy, generalisation gap = train accuracy - test accuracy
(percentage points), final top eigenvalue, and the paired difference of test accuracy to ``base``.
At ``f = 1`` both selections pick every tensor (FlatPO = SAM with the global norm), so the random arm is not
run again: it is the same optimizer as the top arm.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


from .eigen import top_eigenpairs
from .operators import HessianOperator, use_eager_attention
from .results import AnalysisResult

__all__ = [
    "DEFAULT_FRACTIONS",
    "PreferenceArm",
    "PreferenceResult",
    "preference_arms",
    "top_eigenvalue_hook",
    "summarize_preference",
    "run_preference",
    "write_preference_outputs",
    "plot_preference",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class PreferenceArm:
    """One trained configuration: ``label`` (directory name), the ``method`` mapping, and its fraction/selection."""

    label: str
    method: dict[str, Any]
    fraction: float | None
    selection: str | None


def parse_fractions(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.01,0.05"`` -> ``(0.01, 0.05)``; each fraction must lie in (0, 1]; duplicates are rejected."""
    if isinstance(text, str):
        try:
            values = tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--fractions must be comma-separated numbers, got {text!r}") from None
    else:
        values = tuple(float(x) for x in text)
    if not values:
        raise ValueError("--fractions must list at least one fraction")
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad:
        raise ValueError(f"--fractions entries must lie in (0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"--fractions has duplicates: {values}")
    return tuple(sorted(values))


def preference_arms(method: dict[str, Any], fractions: Sequence[float]) -> list[PreferenceArm]:
    """``base`` + (``flatpo`` top-f, ``flatpo`` random-f) per fraction (no random arm at f = 1).

    ``rho`` (default 0.05) and, when the config's method is already ``flatpo``, its other keywords
    (``granularity``, ``normalize_over``) are kept; ``fraction`` and ``selection`` are set per arm.
    """
    keep: dict[str, Any] = {"rho": method.get("rho", 0.05)}
    if method.get("name") == "flatpo":
        keep.update({k: v for k, v in method.items() if k not in ("name", "fraction", "selection", "rho")})
    arms = [PreferenceArm("base", {"name": "base"}, None, None)]
    for f in fractions:
        for selection in ("topk", "random"):
            if selection == "random" and f >= 1.0:
                continue
            m = {"name": "flatpo", **keep, "fraction": float(f), "selection": selection}
            tag = "top" if selection == "topk" else "random"
            arms.append(PreferenceArm(f"flatpo-{tag}-{f:g}", m, float(f), selection))
    return arms


def top_eigenvalue_hook(
    num_batches: int = 1, *, ncv: int = 12, tol: float = 1e-3, seed: int = 0
) -> Callable[[Any], dict[str, float]]:
    """An ``extra_eval(task)`` hook for ``train_run``: the top Hessian eigenvalue of the training loss over
    ``task.analysis_batches(num_batches)`` (trainable tensors, eval mode, eager attention), by scipy ``eigsh``
    (``k=1``, ``which="LA"``) with a small Lanczos basis ``ncv`` (about ``ncv`` HVPs per restart; on a CPU one
    MiniLM HVP takes seconds).  ``top_eigenvalue_residual`` = ``||H v - lambda v||`` and
    ``top_eigenvalue_converged`` are recorded with it.  Parameters and the model's mode are left unchanged.
    (Train accuracy comes from the runner's ``train`` eval split.)

    Not LOBPCG on a tiny budget: when it stops unconverged, scipy returns the iterate with the *smallest
    residual*, which for a random start on a nearly low-rank Hessian is often the start vector itself (Ritz
    value ~ 0); measured here on 3 of 12 MiniLM runs (values 6e-5 and 2e-4 where eigsh gives ~0.7-0.9).
    """

    def hook(task: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        model = task.model
        use_eager_attention(model)
        op = HessianOperator(model, task.loss, task.analysis_batches(num_batches))
        eig = top_eigenpairs(op, 1, tol=tol, ncv=min(ncv, op.dim - 1), seed=seed)
        return {
            "top_eigenvalue": eig.eigenvalues[0] if eig.eigenvalues else float("nan"),
            "top_eigenvalue_residual": eig.residuals[0] if eig.residuals else float("nan"),
            "top_eigenvalue_converged": float(eig.converged),
            "top_eigenvalue_matvecs": float(eig.num_matvecs),
            "top_eigenvalue_seconds": time.perf_counter() - t0,
        }

    return hook


def _finite(values: Sequence[float]) -> list[float]:
    return [float(x) for x in values if x is not None and math.isfinite(x)]


@dataclasses.dataclass(frozen=True)
class PreferenceResult(AnalysisResult):
    """Per-run records and the per-arm summary of the preference experiment."""

    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    runs: tuple[dict[str, Any], ...]
    summary: tuple[dict[str, Any], ...]
    wall_seconds: float
    settings: dict[str, Any]


def summarize_preference(runs: Sequence[dict[str, Any]], arms: Sequence[PreferenceArm]) -> list[dict[str, Any]]:
    """Mean +- std (ddof=1) over seeds per arm of test accuracy, gap and top eigenvalue, and the paired
    difference of test accuracy to ``base`` with its 95 % Student-t interval and verdict
    (``flatpeft.experiments.stats``: ``mean_std``, ``paired_difference``).

    ``runs`` rows carry ``label``, ``seed``, ``accuracy``, ``train_accuracy``, ``top_eigenvalue`` (accuracies in
    [0, 1]; the summary reports percentage points).
    """
    from flatpeft.experiments.stats import mean_std, paired_difference

    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r["label"], {})[int(r["seed"])] = r
    base = by_label.get("base", {})
    rows = []
    for arm in arms:
        recs = by_label.get(arm.label, {})
        if not recs:
            continue
        seeds = sorted(recs)
        acc = [100 * recs[s]["accuracy"] for s in seeds]
        gap = [100 * (recs[s]["train_accuracy"] - recs[s]["accuracy"]) for s in seeds]
        eig = _finite([recs[s].get("top_eigenvalue", float("nan")) for s in seeds])
        row: dict[str, Any] = {
            "arm": arm.label,
            "method": arm.method["name"],
            "selection": arm.selection or "",
            "fraction": arm.fraction if arm.fraction is not None else float("nan"),
            "seeds": len(seeds),
        }
        for name, vals in (("accuracy", acc), ("gap", gap), ("top_eigenvalue", eig)):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(vals)
        paired = [s for s in seeds if s in base]
        if arm.label != "base" and paired:
            d = paired_difference([100 * recs[s]["accuracy"] for s in paired],
                                  [100 * base[s]["accuracy"] for s in paired])
            row.update(diff_to_base_mean=d.mean, diff_to_base_std=d.std, diff_ci_low=d.ci_low,
                       diff_ci_high=d.ci_high, verdict=d.verdict,
                       better_than_base=sum(1 for s in paired if recs[s]["accuracy"] > base[s]["accuracy"]))
        else:
            row.update(diff_to_base_mean=math.nan, diff_to_base_std=math.nan, diff_ci_low=math.nan,
                       diff_ci_high=math.nan, verdict="", better_than_base=None)
        rows.append(row)
    return rows


def _fmt(m: float, s: float, digits: int = 1) -> str:
    if not math.isfinite(m):
        return "n/a"
    if not math.isfinite(s):  # one seed: no std
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def preference_markdown(result: PreferenceResult) -> str:
    """The summary as a Markdown table (accuracies and gaps in %, eigenvalues to 3 significant digits)."""
    lines = [
        "# Flatness-preference experiment (FlatPO top-f vs random-f)",
        "",
        f"Seeds: {list(result.seeds)}; fractions: {list(result.fractions)}; wall time {result.wall_seconds:.0f} s.",
        "Values are mean ± std over seeds; gap = train accuracy - test accuracy (percentage points);",
        "diff to base = paired difference of test accuracy (same seed). At f = 1 the random arm equals the top arm.",
        *(["", *result.settings["code"]] if result.settings.get("code") else []),
        "",
        "| arm | f | test accuracy (%) | gap (pp) | top eigenvalue | diff to base (pp) | 95 % CI | seeds better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.summary:
        f = "" if not math.isfinite(r["fraction"]) else f"{r['fraction']:g}"
        em, es = r["top_eigenvalue_mean"], r["top_eigenvalue_std"]
        eig = "n/a" if not math.isfinite(em) else (f"{em:.3g} ± {es:.2g}" if math.isfinite(es) else f"{em:.3g}")
        diff = "" if r["arm"] == "base" else _fmt(r["diff_to_base_mean"], r["diff_to_base_std"])
        ci = ""
        if r["arm"] != "base":
            ci = (f"[{r['diff_ci_low']:.1f}, {r['diff_ci_high']:.1f}] {r['verdict']}"
                  if math.isfinite(r["diff_ci_low"]) else r["verdict"])
        better = "" if r["better_than_base"] is None else f"{r['better_than_base']}/{r['seeds']}"
        lines.append(
            f"| {r['arm']} | {f} | {_fmt(r['accuracy_mean'], r['accuracy_std'])} | "
            f"{_fmt(r['gap_mean'], r['gap_std'])} | {eig} | {diff} | {ci} | {better} |"
        )
    return "\n".join(lines) + "\n"


def plot_preference(result: PreferenceResult, path: str | Path) -> Path:
    """Three panels vs f (log axis): test accuracy, generalisation gap, top eigenvalue; top-f and random-f
    as lines with std error bars, base as a horizontal band (mean +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["arm"]: r for r in result.summary}
    base = rows.get("base")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("accuracy", "test accuracy (%)"), ("gap", "train - test accuracy (pp)"), ("top_eigenvalue", "top Hessian eigenvalue"))
    for ax, (key, ylabel) in zip(axes, panels):
        for selection, color, label in (("topk", "C0", "top-f (FlatPO)"), ("random", "C1", "random-f")):
            pts = sorted(
                (r["fraction"], r[f"{key}_mean"], r[f"{key}_std"])
                for r in result.summary
                if r["selection"] == selection or (selection == "random" and r["selection"] == "topk" and r["fraction"] >= 1.0)
            )
            if pts:
                xs, ms, ss = zip(*pts)
                ss = [s if math.isfinite(s) else 0.0 for s in ss]
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=color, label=label)
        if base is not None and math.isfinite(base[f"{key}_mean"]):
            m, s = base[f"{key}_mean"], base[f"{key}_std"]
            s = s if math.isfinite(s) else 0.0
            ax.axhspan(m - s, m + s, color="grey", alpha=0.25, label="base (mean ± std)")
            ax.axhline(m, color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("fraction f of tensors perturbed")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Flatness preference: FlatPO top-f vs random-f ({len(result.seeds)} seed(s))")
    fig.tight_layout()
    path = Path(path)
    from flatpeft.experiments.rundir import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_preference_outputs(result: PreferenceResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``preference.json``, ``preference.md``, ``preference.csv`` (summary) and ``preference_runs.csv``,
    and the plot ``preference.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": result.save(out_dir / "preference.json")}
    from flatpeft.experiments.rundir import write_atomic

    paths["md"] = write_atomic(out_dir / "preference.md", preference_markdown(result))
    for name, rows in (("preference.csv", result.summary), ("preference_runs.csv", result.runs)):
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
        paths[name] = write_atomic(out_dir / name, buf.getvalue())
    paths["png"] = plot_preference(result, out_dir / "preference.png")
    return paths


def _number(value) -> float:
    """A metric from eval.json as a float: strict JSON stores non-finite values (and absent ones) as null."""
    return float("nan") if value is None else float(value)


def _check_preference_config(cfg: Any, arms: Sequence[Any], out_dir: Path) -> None:
    """Everything that would fail only after training, checked first: the test split is evaluated (the table
    reports test accuracy) and exists, every arm's method and keywords are valid, the output directory is one
    flatpeft may own. Raises ``ValueError`` naming the key."""
    from flatpeft.experiments.rundir import check_output_dir
    from flatpeft.experiments.runner import validate_config

    if "test" not in cfg.train.eval_splits:
        raise ValueError(f"train.eval_splits: the preference experiment reports test accuracy, so it must include "
                         f"test (got {list(cfg.train.eval_splits)}; train is added for the gap)")
    check_output_dir(out_dir)
    for arm in arms:
        validate_config(_arm_config(cfg, arm))


def run_preference(
    cfg: Any,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = 3,
    out_dir: str | Path,
    overwrite: bool = False,
    eig_batches: int = 1,
    eig_ncv: int = 12,
    progress: bool = True,
    resume: bool = False,
    keep_other_code: bool = False,
) -> PreferenceResult:
    """Train every arm of :func:`preference_arms` for seeds ``0..seeds-1`` and summarise.

    Each arm is one :func:`flatpeft.experiments.runner.compare` directory ``out_dir/<arm>`` (runs in
    ``out_dir/<arm>/<method>/seed<s>``) of ``cfg`` with the arm's ``method`` and ``train.eval_splits`` including
    ``train`` (for the gap); the top-eigenvalue measurement is compare's ``extra_eval`` hook. So the guards are
    compare's: ``out_dir`` must be new or empty unless ``overwrite`` (every run redone) or ``resume`` (finished runs
    with the same settings and data are read, not retrained; other settings or data are refused by name; a run
    trained by other code is retrained unless ``keep_other_code``, and the tables name the code of every run).
    """
    from flatpeft.experiments.runner import _read_eval, code_notes, compare, run_dir_for

    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    fractions = parse_fractions(fractions)
    out_dir = Path(out_dir)
    arms = preference_arms(dict(cfg.method), fractions)
    _check_preference_config(cfg, arms, out_dir)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume are mutually exclusive")
    if keep_other_code and not resume:
        raise ValueError("--keep-other-code keeps finished runs of other code when resuming: use it with --resume")
    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise ValueError(f"output directory {str(out_dir)!r} exists and is not empty; pass --overwrite to replace it "
                         "(or --resume to reuse its finished runs)")
    hook = top_eigenvalue_hook(eig_batches, ncv=eig_ncv)
    t0 = time.perf_counter()
    records: list[tuple[int, int, dict[str, Any]]] = []
    used: list[tuple[str, int, Path]] = []
    for k, arm in enumerate(arms):
        arm_cfg = _arm_config(cfg, arm)
        method = arm.method["name"]
        compare(arm_cfg, [method], list(range(seeds)), out_dir=out_dir / arm.label, overwrite=overwrite,
                resume=resume, extra_eval=hook, progress=progress, keep_other_code=keep_other_code)
        for seed in range(seeds):
            run = run_dir_for(out_dir / arm.label, method, seed)
            metrics = _read_eval(run)
            used.append((arm.label, seed, run))
            records.append((seed, k, {
                "label": arm.label, "method": method, "selection": arm.selection or "",
                "fraction": arm.fraction if arm.fraction is not None else float("nan"), "seed": seed,
                "accuracy": _number(metrics.get("accuracy")), "train_accuracy": _number(metrics.get("train_accuracy")),
                "top_eigenvalue": _number(metrics.get("top_eigenvalue")),
                "top_eigenvalue_residual": _number(metrics.get("top_eigenvalue_residual")),
                "seconds": round(_number(metrics.get("train_time_s")) + _number(metrics.get("eval_time_s")), 2)}))
    runs = [r for _, _, r in sorted(records, key=lambda x: (x[0], x[1]))]   # seed-major, arms in order
    result = PreferenceResult(
        fractions=tuple(fractions),
        seeds=tuple(range(seeds)),
        runs=tuple(runs),
        summary=tuple(summarize_preference(runs, arms)),
        wall_seconds=round(time.perf_counter() - t0, 1),
        settings={"eig_batches": eig_batches, "eig_ncv": eig_ncv, "method": dict(cfg.method),
                  "train": dataclasses.asdict(cfg.train) if dataclasses.is_dataclass(cfg.train) else str(cfg.train),
                  "code": code_notes(used)},
    )
    write_preference_outputs(result, out_dir)
    return result


def _arm_config(cfg: Any, arm: PreferenceArm) -> Any:
    """``cfg`` with the arm's method and the ``train`` split evaluated too (for the generalisation gap)."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.method = dict(arm.method)
    if "train" not in run_cfg.train.eval_splits:
        run_cfg.train.eval_splits = [*run_cfg.train.eval_splits, "train"]
    return run_cfg
