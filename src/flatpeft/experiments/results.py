"""Tables and a chart for a ``flatpeft compare`` output directory.

Reads every ``<out>/<method>/seed<k>/eval.json`` (finished runs only), then per method: mean ± std and the
per-seed values of ``accuracy``; the paired difference to ``base`` over the seeds both have, with its 95 %
Student-t CI and a verdict that calls a method better / worse only when the CI excludes zero
(:mod:`flatpeft.experiments.stats`); time per step as a ratio to ``base`` (ratio of the means); and every
other numeric metric of ``eval.json`` as mean ± std. Writes ``results.csv`` (raw fractions and seconds),
``results.md`` (accuracy-like metrics in %, differences in percentage points) and ``results.png``, each
replaced atomically (a reader, or a process killed mid-write, never leaves half a table). Runs that failed
(diverged) are listed per method (``n_failed``, ``failed_seeds``) and never enter the statistics.
"""
from __future__ import annotations

import json
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .rundir import atomic_path
from .stats import mean_std, paired_difference

__all__ = ["CompareResult", "collect_runs", "summarize", "to_markdown", "plot", "collect_and_write", "REFERENCE"]

REFERENCE = "base"
#: eval.json entries that are settings or bookkeeping, not metrics (also every ``*_examples`` count)
_SETTINGS = ("seed", "steps")


def _is_setting(key: str) -> bool:
    return key in _SETTINGS or key.endswith("_examples")


@dataclass
class CompareResult:
    """What a comparison produced: per-run rows, the per-method summary and the written files."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    markdown: str
    paths: dict[str, Path]
    failed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def collect_runs(out_dir: str | Path, methods: Sequence[str] | None = None,
                 runs: Sequence[tuple[str, int, Path]] | None = None) -> pd.DataFrame:
    """One row per finished run: ``method``, ``seed`` and the numeric entries of its ``eval.json``.

    ``runs``: explicit ``(method, seed, run_dir)`` triples (what ``compare`` planned and checked); default:
    every ``<out_dir>/<method>/seed<k>/eval.json``.
    """
    out_dir = Path(out_dir)
    if runs is None:
        runs = [(p.parent.parent.name, int(p.parent.name.removeprefix("seed")), p.parent)
                for p in sorted(out_dir.glob("*/seed*/eval.json"))]
    rows = []
    for method, seed, run_dir in runs:
        if methods is not None and method not in methods:
            continue
        data = json.loads((Path(run_dir) / "eval.json").read_text())
        row: dict[str, Any] = {"method": method, "seed": int(data.get("seed", seed))}
        row.update({k: float(v) for k, v in data.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_setting(k)})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["method", "seed"])
    order = list(methods) if methods is not None else sorted(df["method"].unique(), key=lambda m: (m != REFERENCE, m))
    df["method"] = pd.Categorical(df["method"], categories=[m for m in order if m in set(df["method"])], ordered=True)
    return df.sort_values(["method", "seed"]).reset_index(drop=True)


def summarize(runs: pd.DataFrame, metric: str = "accuracy", reference: str = REFERENCE,
              confidence: float = 0.95) -> pd.DataFrame:
    """Per-method summary (see module docstring); columns are documented in ``docs/cli.md``."""
    if runs.empty:
        return pd.DataFrame()
    others = [c for c in runs.columns if c not in ("method", "seed", metric, "time_per_step")]
    ref = runs[runs["method"] == reference].set_index("seed") if reference in set(runs["method"]) else None
    ref_time = float(ref["time_per_step"].mean()) if ref is not None and "time_per_step" in ref else math.nan
    rows = []
    for method, group in runs.groupby("method", observed=True, sort=True):
        g = group.set_index("seed")
        row: dict[str, Any] = {"method": method, "n_seeds": len(g), "seeds": " ".join(str(s) for s in g.index)}
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(g[metric])
        for seed, value in g[metric].items():
            row[f"{metric}_seed{seed}"] = value
        if ref is not None and method != reference:
            common = sorted(set(g.index) & set(ref.index))
            diff = paired_difference(g.loc[common, metric], ref.loc[common, metric], confidence)
            row.update({"diff_mean": diff.mean, "diff_std": diff.std, "diff_ci_low": diff.ci_low,
                        "diff_ci_high": diff.ci_high, "n_paired": diff.n, "verdict": diff.verdict})
        elif method == reference:
            row.update({"diff_mean": 0.0, "diff_std": math.nan, "diff_ci_low": math.nan, "diff_ci_high": math.nan,
                        "n_paired": len(g), "verdict": "reference"})
        else:
            row.update({"diff_mean": math.nan, "diff_std": math.nan, "diff_ci_low": math.nan,
                        "diff_ci_high": math.nan, "n_paired": 0, "verdict": f"no {reference} runs"})
        if "time_per_step" in g:
            row["time_per_step_mean"], row["time_per_step_std"] = mean_std(g["time_per_step"])
            row["time_ratio_vs_base"] = row["time_per_step_mean"] / ref_time if ref_time > 0 else math.nan
        for col in others:
            row[f"{col}_mean"], row[f"{col}_std"] = mean_std(g[col].dropna())
        rows.append(row)
    return pd.DataFrame(rows)


def _is_percent(name: str) -> bool:
    """Accuracy-like metrics (fractions shown in %), including ``*_accuracy_before`` style variants."""
    stem = name.removesuffix("_before").removesuffix("_after")
    return stem.endswith("accuracy") or stem.endswith("f1")


def _fmt(value: float, pct: bool, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}" if pct else f"{value:.4g}"


def _pm(mean: float, std: float, pct: bool) -> str:
    return _fmt(mean, pct) if std is None or math.isnan(std) else f"{_fmt(mean, pct)} ± {_fmt(std, pct)}"


def to_markdown(summary: pd.DataFrame, metric: str = "accuracy", title: str = "flatpeft compare",
                notes: Sequence[str] = ()) -> str:
    """Markdown table of ``summary`` (accuracy-like metrics in %, differences in percentage points)."""
    if summary.empty:
        return f"# {title}\n\nNo finished runs yet.\n"
    pct = _is_percent(metric)
    unit = " (%)" if pct else ""
    diff_unit = " (pp)" if pct else ""
    other = sorted({c[:-5] for c in summary.columns if c.endswith("_mean")} - {metric, "diff", "time_per_step"})
    other = [c for c in other if c != "failed"]
    has_failed = "n_failed" in summary.columns
    head = ["method", "seeds", f"{metric}{unit}", "per seed", f"Δ vs base{diff_unit} [95 % CI]", "verdict",
            "time/step (s)", "× base"] + [f"{c}{' (%)' if _is_percent(c) else ''}" for c in other]
    head += ["failed runs (seeds)"] if has_failed else []
    lines = [f"# {title}", "", *notes, "" if notes else None, "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines = [x for x in lines if x is not None]
    for _, r in summary.iterrows():
        seeds = [c for c in summary.columns if c.startswith(f"{metric}_seed")]
        per_seed = ", ".join(_fmt(r[c], pct) for c in seeds if not pd.isna(r[c])) or "–"
        if r["verdict"] == "reference":
            diff = "reference"
        elif pd.isna(r["diff_mean"]):
            diff = "–"
        else:
            sign = "+" if r["diff_mean"] >= 0 else ""
            ci = ("" if pd.isna(r["diff_ci_low"]) else
                  f" [{_fmt(r['diff_ci_low'], pct)}, {_fmt(r['diff_ci_high'], pct)}]")
            diff = f"{sign}{_fmt(r['diff_mean'], pct)}{ci} (n={int(r['n_paired'])})"
        cells = [str(r["method"]), str(int(r["n_seeds"])), _pm(r[f"{metric}_mean"], r[f"{metric}_std"], pct),
                 per_seed, diff, "" if r["verdict"] == "reference" else str(r["verdict"]),
                 _pm(r.get("time_per_step_mean", math.nan), r.get("time_per_step_std", math.nan), False),
                 _fmt(r.get("time_ratio_vs_base", math.nan), False, 2)]
        cells += [_pm(r[f"{c}_mean"], r[f"{c}_std"], _is_percent(c)) for c in other]
        if has_failed:
            cells.append(f"{int(r['n_failed'])} ({r['failed_seeds']})" if r["n_failed"] else "0")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: pd.DataFrame, summary: pd.DataFrame, path: str | Path, metric: str = "accuracy") -> Path:
    """Bar chart: per-method mean ± std of ``metric`` with the per-seed points, and the paired
    difference to base with its 95 % CI (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pct = 100.0 if _is_percent(metric) else 1.0
    methods = [str(m) for m in summary["method"]]
    x = np.arange(len(methods))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(methods), 4))
    means = summary[f"{metric}_mean"].to_numpy() * pct
    stds = np.nan_to_num(summary[f"{metric}_std"].to_numpy() * pct)
    ax1.bar(x, means, yerr=stds, capsize=5, color="tab:blue", alpha=0.7)
    for i, m in enumerate(methods):
        vals = runs.loc[runs["method"] == m, metric].to_numpy() * pct
        ax1.scatter(np.full(len(vals), i), vals, color="black", s=12, zorder=3)
    finite = means[np.isfinite(means)]
    if finite.size:
        low = min(finite.min() - stds.max() - 2, np.nanmin(runs[metric].to_numpy() * pct) - 2)
        ax1.set_ylim(bottom=max(0.0, low))
    ax1.set_xticks(x, methods, rotation=30, ha="right")
    ax1.set_ylabel(f"{metric}{' (%)' if pct == 100 else ''}")
    ax1.set_title("mean ± std over seeds (dots: seeds)")
    diffs = summary["diff_mean"].to_numpy() * pct
    err = np.vstack([diffs - summary["diff_ci_low"].to_numpy() * pct, summary["diff_ci_high"].to_numpy() * pct - diffs])
    ax2.errorbar(x, diffs, yerr=np.nan_to_num(err), fmt="o", capsize=5, color="tab:red")
    ax2.axhline(0.0, color="grey", lw=1)
    ax2.set_xticks(x, methods, rotation=30, ha="right")
    ax2.set_ylabel(f"Δ vs base{' (pp)' if pct == 100 else ''}")
    ax2.set_title("paired difference, 95 % CI")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path


def with_failures(summary: pd.DataFrame, failed: dict[str, dict[str, Any]], metric: str = "accuracy",
                  methods: Sequence[str] | None = None) -> pd.DataFrame:
    """``summary`` plus ``n_failed`` / ``failed_seeds`` per method (a row for a method whose runs all failed)."""
    if not failed:
        return summary
    per: dict[str, list[int]] = {}
    for rec in failed.values():
        per.setdefault(str(rec["method"]), []).append(int(rec["seed"]))
    rows = summary.to_dict("records") if not summary.empty else []
    present = {str(r["method"]) for r in rows}
    rows += [{"method": m, "n_seeds": 0, "seeds": "", "verdict": "all runs failed"} for m in per if m not in present]
    out = pd.DataFrame(rows)
    for col in (f"{metric}_mean", f"{metric}_std", "diff_mean", "diff_std", "diff_ci_low", "diff_ci_high", "n_paired"):
        if col not in out:
            out[col] = math.nan
    out["method"] = out["method"].astype(str)
    out["n_failed"] = [len(per.get(m, [])) for m in out["method"]]
    out["failed_seeds"] = [" ".join(map(str, sorted(per.get(m, [])))) for m in out["method"]]
    order = list(methods) if methods is not None else sorted(out["method"], key=lambda m: (m != REFERENCE, m))
    return out.sort_values("method", key=lambda col: col.map({m: i for i, m in enumerate(order)})).reset_index(drop=True)


def _write_table_files(out_dir: Path, markdown: str, summary: pd.DataFrame) -> dict[str, Path]:
    """``results.md`` and ``results.csv``, each through a temporary file and a rename."""
    from .rundir import write_atomic

    paths = {"md": out_dir / "results.md", "csv": out_dir / "results.csv"}
    write_atomic(paths["md"], markdown)
    write_atomic(paths["csv"], summary.to_csv(index=False))
    return paths


def collect_and_write(out_dir: str | Path, methods: Sequence[str] | None = None, metric: str = "accuracy",
                      notes: Sequence[str] = (), runs: Sequence[tuple[str, int, Path]] | None = None,
                      failed: dict[str, dict[str, Any]] | None = None, code: Sequence[str] = ()) -> CompareResult:
    """Collect finished runs under ``out_dir`` (or the given ``runs``) and write ``results.csv``, ``results.md``
    and ``results.png``; ``failed`` (``{"sam/seed0": {"method", "seed", "step", "error"}}``) marks failed runs;
    ``code``: lines naming the code behind the runs (``runner.code_notes``), shown under the notes."""

    out_dir = Path(out_dir)
    failed = dict(failed or {})
    table = collect_runs(out_dir, methods, runs)
    summary = with_failures(summarize(table, metric), failed, metric, methods)
    notes = list(notes) or [
        f"{len(table)} finished run(s) in `{out_dir}`. Mean ± std over seeds; Δ: paired difference to `base` over "
        "the seeds both have, with its 95 % Student-t confidence interval. A method is called better or worse "
        "only when the interval excludes zero. Accuracy-like metrics in %, differences in percentage points; "
        "time per step excludes evaluation, × base is the ratio of mean step times."]
    if code:
        notes += ["", *code]
    if failed:
        notes.append("")
        notes.append("**Failed runs** (not in the statistics): " + "; ".join(
            f"{rec['method']} seed {rec['seed']}: {rec.get('error', 'failed')}" for rec in failed.values()))
    markdown = to_markdown(summary, metric, notes=notes)
    paths = _write_table_files(out_dir, markdown, summary)
    finished = summary[summary["n_seeds"] > 0] if not summary.empty else summary
    if not finished.empty:
        with atomic_path(out_dir / "results.png") as tmp:
            plot(table, finished.reset_index(drop=True), tmp, metric)
        paths["png"] = out_dir / "results.png"
    return CompareResult(table, summary, markdown, paths, failed)
