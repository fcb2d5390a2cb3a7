"""The results page of ``flatpeft suite`` (``docs/results.md``), rebuilt from the runs' ``eval.json`` files.

Every number on the page is read from a run directory of the suite (or its ``suite_log.json`` for wall time
and load); nothing is typed in. Statistics: :func:`flatpeft.experiments.stats.paired_difference` (paired over
the seeds both methods have, 95 % Student-t interval). The page names the code behind every table (the code
each run recorded, :mod:`flatpeft.experiments.provenance`) and states per task whether its runs reproduce bit
for bit (:data:`DETERMINISM`).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .results import _is_percent, collect_runs, plot, summarize
from .stats import mean_std, paired_difference

#: tolerance of the "matches" claims (equivalence): the interval's lower end must be above -MARGIN
MARGIN = 0.01

#: Per built-in task: does a rerun reproduce its numbers bit for bit, and when not, why (docs/cli.md, "Determinism").
DETERMINISM: dict[str, str] = {
    "text_classification": (
        "bit for bit on the same machine with the same torch thread count, code and library versions (every "
        "random draw is seeded: validation carve, shots, label noise, test subset, head and LoRA initialisation, "
        "dropout, batch order; evaluation batches are length-sorted); another thread count or CPU can sum "
        "floats in another order (large matrix products are split across threads), which changes the last bits "
        "and, over training, possibly some predictions (a tiny model may still agree); on a "
        "GPU some CUDA kernels (atomic-add reductions in backward passes, the memory-efficient attention "
        "backward) are not deterministic and flatpeft does not turn on torch's deterministic algorithms, so "
        "bit-for-bit reruns are not guaranteed there"),
    "clip_fewshot": (
        "bit for bit on the same machine with the same thread count, code and asset cache (the shots, the "
        "template draw and the batch order are seeded); the pre-aligned projections and the before-fine-tuning "
        "metrics are computed once and cached in the asset cache (`multimodal/clip_prealign_*`, "
        "`clip_before_*`), keyed by their settings, not by the code or machine that made them: a cache "
        "built elsewhere or by older code gives other starting weights (their sha256 is recorded with each run "
        "as `data_sha256.prealign`). Other thread counts, CPUs or a GPU: as text_classification"),
    "vlm_instruct": (
        "bit for bit on the same machine with the same thread count, code and asset cache (shots, caption mix "
        "and batch order are seeded; answers are generated greedily); the pre-aligned projector and the image "
        "features are computed once and cached in the asset cache (`multimodal/vlm_prealign_*`, `features_*`, "
        "`vlm_before_*`), keyed by their settings, not by the code or machine that made them. Other thread "
        "counts, CPUs or a GPU: as text_classification, and greedy generation can then pick another token"),
    "hf_vlm": (
        "in float32 on a CPU as text_classification; the GPU recipe (bfloat16) is not bit for bit: its attention "
        "and reduction kernels are not deterministic and bfloat16 rounding amplifies the differences"),
}


def _fmt(v: float, pct: bool, digits: int = 1, sign: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    s = f"{100 * v:+.{digits}f}" if (pct and sign) else f"{100 * v:.{digits}f}" if pct else (
        f"{v:+.3g}" if sign else f"{v:.4g}")
    return s


def _pm(m: float, s: float, pct: bool) -> str:
    return _fmt(m, pct) + ("" if s is None or not np.isfinite(s) else f" ± {_fmt(s, pct)}")


def _diff_cell(d, pct: bool) -> str:
    if d is None or d.n == 0:
        return "–"
    if d.n < 2:
        return f"{_fmt(d.mean, pct, sign=True)} (1 seed)"
    return f"{_fmt(d.mean, pct, sign=True)} [{_fmt(d.ci_low, pct, sign=True)}, {_fmt(d.ci_high, pct, sign=True)}]"


def paired(runs: pd.DataFrame, a: str, b: str, metric: str, other: pd.DataFrame | None = None):
    """Paired difference ``a - b`` of ``metric`` (``b`` looked up in ``other`` when given) or None."""
    other = runs if other is None else other
    if metric not in runs or metric not in other:
        return None
    ra = runs[runs["method"] == a].set_index("seed")[metric].dropna()
    rb = other[other["method"] == b].set_index("seed")[metric].dropna()
    common = sorted(set(ra.index) & set(rb.index))
    if not common:
        return None
    return paired_difference(ra.loc[common].to_numpy(), rb.loc[common].to_numpy())


def _settings_line(cfg: dict[str, Any]) -> str:
    d, p, t, m = cfg.get("data", {}), cfg.get("peft", {}), cfg.get("train", {}), cfg.get("method", {})
    parts = [f"task `{cfg.get('task')}`", f"model `{cfg.get('model')}`",
             f"shots {d.get('shots')} per class" if d.get("shots") is not None else "",
             f"max length {d.get('max_length')}" if cfg.get("task") == "text_classification" else "",
             f"{p.get('type')} r={p.get('r')} alpha={p.get('alpha')} on {p.get('target_modules')}",
             f"{t.get('steps')} steps, batch {t.get('batch_size')}, {t.get('base_optimizer')} lr {t.get('lr')}",
             ("method keywords " + ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")) if len(m) > 1 else ""]
    args = cfg.get("task_args") or {}
    if args:
        parts.append("task_args " + ", ".join(f"{k}={v}" for k, v in args.items()))
    return "; ".join(x for x in parts if x)


#: verdict of a pair of methods that gave the same number on every seed: no evidence either way
IDENTICAL = "not tested: identical on every seed"


def _verdict(d, kind: str) -> str:
    """``supports`` / ``refutes`` / ``cannot resolve`` for a claim of ``kind`` ("better" or "match") from the
    paired difference ``d`` (see the page's verdict rule); :data:`IDENTICAL` when the two methods gave the same
    number on every seed (a method that did not act, e.g. SPIDER's default scope on a pure-LoRA model)."""
    if d is None or d.n < 2 or not np.isfinite(d.ci_low):
        return "cannot resolve (too few seeds)"
    if d.mean == 0 and d.std == 0:
        return IDENTICAL
    if kind == "match":
        if d.ci_high < 0 and d.ci_low < -MARGIN:
            return "refutes"
        if d.ci_low > -MARGIN:
            return "supports"
        return "cannot resolve"
    if d.ci_low > 0:
        return "supports"
    if d.ci_high < 0:
        return "refutes"
    if d.ci_high < MARGIN:
        return f"refutes a gain of {100 * MARGIN:.0f} pp or more"
    return "cannot resolve"


def _kind(claim: dict[str, str]) -> str:
    """The verdict rule of a claim from its explicit ``kind``: "match" (equivalence) or "better" (also for
    "forgets-less", a better value of a retained metric)."""
    kind = claim.get("kind")
    if kind not in ("better", "forgets-less", "match"):
        raise ValueError(f"claim {claim.get('id')!r}: kind must be better, forgets-less or match, got {kind!r}")
    return "match" if kind == "match" else "better"


def _claim_rows(claim: dict[str, str], data: dict[str, dict[str, Any]], ran: list[str]):
    """``(task, metric, label a, label b, paired difference)`` for every task that can test ``claim``: its
    method ``a`` against ``b`` and, for each ablation of ``a`` on that task (e.g. SPIDER with another scope),
    the ablation against ``b``."""
    for n in ran:
        d = data[n]
        metric = d["task"].metrics[0] if claim["metric"] == "primary" else claim["metric"]
        if metric not in d["task"].metrics or claim["b"] not in d["methods"]:
            continue
        if claim["a"] in d["methods"]:
            pdiff = paired(d["runs"], claim["a"], claim["b"], metric)
            if pdiff is not None:
                yield n, metric, claim["a"], claim["b"], pdiff
        for a, ar in d["abl"].values():
            if a.method != claim["a"] or ar.empty:
                continue
            label = f"{a.method} ({a.name})"
            pdiff = paired(ar, label, claim["b"], metric, other=d["runs"])
            if pdiff is not None:
                yield n, metric, label, claim["b"], pdiff


def _task_runs(root: Path, unit: str, methods: list[str], config: str | None = None,
               overrides: list[str] | None = None, seeds: list[int] | None = None) -> pd.DataFrame:
    """The finished runs of one compare directory. With ``config`` (the plan's settings), only the runs whose
    recorded settings are the planned ones (compare's check), so the page never mixes settings."""
    d = root / unit
    if not d.is_dir():
        return pd.DataFrame(columns=["method", "seed"])
    runs_list = None
    if config is not None and seeds is not None:
        runs_list = _unit_runs(root, unit, methods, config, overrides, seeds)
    runs = collect_runs(d, methods, runs_list)
    if "seen_classes_accuracy" in runs and "seen_classes_accuracy_before" in runs:
        before = runs["seen_classes_accuracy_before"].replace(0, np.nan)
        runs["retained_fraction"] = runs["seen_classes_accuracy"] / before
    return runs


def _unit_runs(root: Path, unit: str, methods: list[str], config: str, overrides: list[str] | None,
               seeds: list[int]) -> list[tuple[str, int, Path]]:
    """``(method, seed, run dir)`` of the finished runs of one compare directory whose recorded settings are the
    planned ones and whose data are the current files (compare's check), whatever code trained them: the page
    shows them and names their code."""
    from .config import load_config
    from .runner import _run_config, _valid_runs, _with_method, run_dir_for

    d = root / unit
    if not d.is_dir():
        return []
    cfg = load_config(config, overrides or [])
    plan = {(m, s): _run_config(_with_method(cfg, m), s, run_dir_for(d, m, s)) for s in seeds for m in methods}
    return _valid_runs(plan, d, keep_other_code=True, strict_data=False)


def _task_code(plan, root: Path, t) -> list[tuple[str, int, dict[str, Any] | None]]:
    """``(method label, seed, code record)`` of every run shown for task ``t`` (its groups and ablations)."""
    from .runner import run_code
    from .suite import task_groups

    seeds = plan.task_seeds(t)
    out = []
    for name, ms in task_groups(plan, t):
        out += [(m, s, run_code(r)) for m, s, r in _unit_runs(root, name, ms, t.config, t.set, seeds)]
    for a in t.ablations:
        out += [(f"{a.method} ({a.name})", s, run_code(r))
                for _, s, r in _unit_runs(root, f"{t.name}__{a.name}", [a.method], t.config, [*t.set, *a.set], seeds)]
    return out


def _seeds_text(seeds: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for i, s in enumerate(sorted(seeds)):
        if start is None:
            start = s
        nxt = sorted(seeds)[i + 1] if i + 1 < len(seeds) else None
        if nxt != s + 1:
            parts.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def _code_lines(runs: list[tuple[str, int, dict[str, Any] | None]]) -> list[str]:
    """The code behind one task's table: one version, or each version with the runs it trained."""
    from .provenance import code_label, code_record

    current = code_label(code_record())
    groups: dict[str, dict[str, list[int]]] = {}
    for method, seed, code in runs:
        groups.setdefault(code_label(code), {}).setdefault(method, []).append(seed)
    mark = lambda label: " (the code that wrote this page)" if label == current else ""  # noqa: E731
    if len(groups) == 1:
        (label,) = groups
        return [f"Code: every run of this table was trained by {label}{mark(label)}."]
    lines = [f"Code: **the runs of this table were trained by {len(groups)} code versions** (kept with "
             "`--keep-other-code`):"]
    for label, per in groups.items():
        lines.append(f"* {label}{mark(label)}: " + "; ".join(f"{m} seeds {_seeds_text(s)}" for m, s in per.items()))
    return lines + [""]


def _code_summary(codes: list[list[tuple[str, int, dict[str, Any] | None]]]) -> str:
    """The header's sentence on the code: the code that wrote the page and the versions behind its runs
    (``codes``: :func:`_task_code` of every task)."""
    from .provenance import NOT_RECORDED, code_label, code_record

    current = code_label(code_record())
    counts: dict[str, int] = {}
    for task_codes in codes:
        for _, _, code in task_codes:
            counts[code_label(code)] = counts.get(code_label(code), 0) + 1
    text = f"This page was written by {current}."
    if not counts:
        return text
    if list(counts) == [current]:
        return text + f" Every run behind its tables ({counts[current]}) was trained by that code."
    versions = "; ".join(f"{label}: {n} run(s)" for label, n in counts.items())
    note = (" Runs whose code is not recorded may come from any earlier code: their numbers need not be what "
            "the current code gives." if NOT_RECORDED in counts else "")
    return text + f" **Its runs were trained by {len(counts)} code version(s)**: {versions}.{note}"


def _failed(root: Path, unit: str) -> dict[str, Any]:
    """The failed runs ``compare_plan.json`` of a unit records; a damaged file is an error naming it."""
    path = root / unit / "compare_plan.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        data = err
    if not isinstance(data, dict) or not isinstance(data.get("failed") or {}, dict):
        raise ValueError(f"{path}: damaged (not the compare plan flatpeft wrote: {str(data)[:80]}); run the suite "
                         f"again to rewrite it (its compare directory resumes), or move it away")
    return data.get("failed") or {}


def _trained(inv: dict[str, Any]) -> bool:
    """Whether a suite invocation trained any run. A page rebuild, or a resume that found every run finished,
    adds no run time and must not dilute the load figures. In records written before units logged ``trained``,
    a unit counts as training when it took 5 s or more (a resume that finds its runs finished takes about 3 s)."""
    if not inv.get("train"):
        return False
    return any(u["trained"] > 0 if "trained" in u else float(u.get("wall_s", 0)) >= 5.0 for u in inv["units"])


def _unit_wall(log: dict[str, Any]) -> tuple[dict[str, float], float, list[float], dict[str, Any]]:
    """Wall seconds per unit (summed over invocations), total suite wall, load samples, last machine."""
    per: dict[str, float] = {}
    loads, machine, spans = [], {}, []
    for inv in log.get("invocations", []):
        if not _trained(inv):
            continue
        spans.append((float(inv["start"]), float(inv.get("end", inv["start"]))))
        if "load_mean" in inv:
            loads += [inv["load_mean"], inv.get("load_max", inv["load_mean"])]
        machine = inv.get("machine", machine)
        for r in inv["units"]:
            per[r["unit"]] = per.get(r["unit"], 0.0) + float(r["wall_s"])
    total, end = 0.0, -math.inf  # union of the invocations' time spans (parallel invocations count once)
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return per, total, loads, machine


#: The first line of every page flatpeft writes; a file that does not begin with it is not replaced.
PAGE_TITLE = "# Results: every built-in task x methods x seeds"


def _is_own_page(page: Path) -> bool:
    """Whether ``page`` is a results page flatpeft wrote (it begins with :data:`PAGE_TITLE`)."""
    try:
        with open(page, encoding="utf-8", errors="replace") as fh:
            return fh.readline().rstrip("\n") == PAGE_TITLE
    except OSError:
        return False


def check_page(page: Path, tasks: list[str]) -> None:
    """Refuse (``ValueError``) to write ``page`` or its plots (``<page stem>/<task>.png``) over files flatpeft
    did not write: an existing page that is not a flatpeft results page, or plots beside a page that is not
    flatpeft's (or absent)."""
    page = Path(page)
    if page.is_dir():
        raise ValueError(f"page {str(page)!r} is a directory; give a file name for the results page (page: / --page)")
    if page.exists() and not _is_own_page(page):
        raise ValueError(f"page {str(page)!r} exists and was not written by flatpeft suite (it does not begin with "
                         f"{PAGE_TITLE!r}); flatpeft never overwrites a file it did not write: set another page "
                         "(the plan's page: key or --page), or move the file away")
    if not page.exists():
        plots = [page.parent / page.stem / f"{t}.png" for t in tasks]
        taken = [str(p) for p in plots if p.exists()]
        if taken:
            raise ValueError(f"page {str(page)!r}: its plots would replace files flatpeft did not write "
                             f"({', '.join(taken[:3])}); set another page (page: / --page), or move them away")


def write_page(plan, root: Path, page: Path, log: dict[str, Any]) -> Path:
    """Write ``page`` (Markdown) and its plots (``<page stem>/<task>.png``) from the runs under ``root``
    (refused by :func:`check_page` where that would replace a file flatpeft did not write)."""
    from .config import read_config_mapping
    from .rundir import write_atomic
    from .suite import CLAIMS

    page = Path(page)
    check_page(page, [t.name for t in plan.tasks])
    fig_dir = page.parent / page.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    per_unit, total_wall, loads, machine = _unit_wall(log)
    invocations = [i for i in log.get("invocations", []) if _trained(i)]
    L: list[str] = []
    L.append(PAGE_TITLE)
    L.append("")
    L.append(f"Produced by `flatpeft suite {plan.path or 'PLAN'}` (with `--resume` semantics: finished runs with "
             "the same settings, data and code are kept, missing ones trained) from the runs under "
             f"`{plan.output_dir}`; regenerated "
             f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Every number below is read from "
             "the runs' `eval.json` files; nothing is typed in.")
    L.append("")
    codes = {t.name: _task_code(plan, root, t) for t in plan.tasks}
    L.append(f"**Code.** {_code_summary(list(codes.values()))} Each task's section names the code behind its table; "
             f"`flatpeft suite {plan.path or 'PLAN'} --reproduce` retrains one seed per task and method at the "
             "current code and reports the largest difference of each metric (docs/cli.md).")
    if machine:
        L.append(f"**Machine.** {machine.get('cores')} CPU cores ({machine.get('cpu')}), no GPU used"
                 f"{'' if not machine.get('gpu') else ' (a GPU was visible)'}; torch {machine.get('torch')}, "
                 f"Python {machine.get('python')}. The machine was shared with other jobs.")
    if invocations:
        j = invocations[-1]
        L.append(f"**Wall time.** {total_wall / 60:.1f} min over {len(invocations)} invocation(s) of the suite "
                 f"({j.get('jobs')} compare director{'y' if j.get('jobs') == 1 else 'ies'} in parallel, "
                 f"{j.get('threads')} torch thread(s) each); per task below. "
                 + (f"Load average (1 min) during the runs: mean {np.mean(loads[::2]):.1f}, max "
                    f"{max(loads[1::2]):.1f} on {machine.get('cores')} cores, so step times and time ratios are only "
                    "indicative." if loads else ""))
    L.append("")
    L.append("**Verdict rule.** For each method the paired difference to `base` (same seed: same initialisation, "
             "k-shot sample, batch order and dropout stream) is averaged over the seeds both have; the 95 % "
             "interval is d̄ ± t(0.975, n−1)·s/√n. A method is called better / worse only when the interval "
             "excludes zero; otherwise *no significant difference*. A claim of a paper is *supported* when the "
             "interval of the difference it predicts excludes zero in its direction, *refuted* when it excludes "
             f"zero in the other direction (or, for a claimed gain, when the whole interval lies below +"
             f"{100 * MARGIN:.0f} pp: *refutes a gain of {100 * MARGIN:.0f} pp or more*; the papers report gains of "
             "1-3 points), and *cannot resolve* otherwise. Claims that a method *matches* "
             f"another are supported when the interval's lower end lies above −{100 * MARGIN:.0f} point. "
             "Two methods that gave the same number on every seed test nothing (*not tested: identical on every "
             "seed*), and a claim about a method is also tested through that method's ablations on the same task. "
             "Accuracies in %, differences in percentage points (pp).")
    L.append("")
    if plan.notes:
        L.append(plan.notes.strip())
        L.append("")

    # ---- collect everything --------------------------------------------------------------------
    data: dict[str, dict[str, Any]] = {}
    from .suite import task_groups

    for t in plan.tasks:
        methods = plan.task_methods(t)
        seeds = plan.task_seeds(t)
        parts = [_task_runs(root, name, ms, t.config, t.set, seeds) for name, ms in task_groups(plan, t)]
        parts = [r for r in parts if not r.empty]
        runs = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["method", "seed"])
        if not runs.empty:
            runs["method"] = pd.Categorical(runs["method"].astype(str), categories=methods, ordered=True)
            runs = runs.sort_values(["method", "seed"]).reset_index(drop=True)
        abl = {}
        for a in t.ablations:
            ar = _task_runs(root, f"{t.name}__{a.name}", [a.method], t.config, [*t.set, *a.set], seeds)
            if not ar.empty:
                ar = ar.assign(method=f"{a.method} ({a.name})")
            abl[a.name] = (a, ar)
        cfg_path = root / t.name / "compare_config.yaml"
        cfg = read_config_mapping(cfg_path) if cfg_path.is_file() else None
        data[t.name] = {"task": t, "methods": methods, "runs": runs, "abl": abl, "cfg": cfg,
                        "failed": _failed(root, t.name)}

    ran = [n for n, d in data.items() if not d["runs"].empty]
    cut = [d["task"] for d in data.values() if d["runs"].empty]

    # ---- summary table ---------------------------------------------------------------------------
    L.append("## Summary")
    L.append("")
    all_methods = list(dict.fromkeys(m for n in ran for m in data[n]["methods"] if m != "base"))
    L.append("Paired difference to `base` of each task's primary metric, pp [95 % interval]; `n` = paired seeds.")
    L.append("")
    L.append("| task (primary metric) | base | " + " | ".join(all_methods) + " |")
    L.append("|---|---|" + "---|" * len(all_methods))
    for n in ran:
        d = data[n]
        runs, metric = d["runs"], d["task"].metrics[0]
        pct = _is_percent(metric)
        b = runs[runs["method"] == "base"][metric] if metric in runs else pd.Series(dtype=float)
        cells = [f"{n} ({metric})", f"{_pm(*mean_std(b), pct)} (n={len(b)})" if len(b) else "–"]
        for m in all_methods:
            pd_ = paired(runs, m, "base", metric) if m in d["methods"] else None
            cells.append(_diff_cell(pd_, pct) + (f" n={pd_.n}" if pd_ is not None else ""))
        L.append("| " + " | ".join(cells) + " |")
    L.append("")

    # ---- claims ------------------------------------------------------------------------------------
    L.append("## The seed papers' claims")
    L.append("")
    L.append("| paper | claim | task | metric | difference tested | Δ, pp [95 % interval] (n) | verdict |")
    L.append("|---|---|---|---|---|---|---|")
    claim_rows = [(c, list(_claim_rows(c, data, ran))) for c in CLAIMS]  # table, words and footnote share them
    for c, rows in claim_rows:
        for n, metric, label_a, label_b, pdiff in rows:
            L.append(f"| {c['paper']} | {c['claim']} | {n} | {metric} | {label_a} − {label_b} | "
                     f"{_diff_cell(pdiff, _is_percent(metric))} ({pdiff.n}) | {_verdict(pdiff, _kind(c))} |")
        if c["id"] == "flatpo-vs-sam":
            for n in ran:
                d = data[n]
                for aname, (a, ar) in d["abl"].items():
                    if ar.empty or a.method != "flatpo":
                        continue
                    metric = d["task"].metrics[0]
                    pdiff = paired(d["runs"], "flatpo", f"{a.method} ({a.name})", metric, other=ar)
                    if pdiff is not None:
                        L.append(f"| FlatPO (flatpeft ablation) | ranking only the adapters (default) beats ranking adapters and head "
                                 f"(ablation `{aname}`) | {n} | {metric} | flatpo − flatpo ({aname}) | "
                                 f"{_diff_cell(pdiff, _is_percent(metric))} ({pdiff.n}) | {_verdict(pdiff, 'better')} |")
    L.append("")
    L.append("In words:")
    L.append("")
    for c, rows in claim_rows:
        verdicts = []
        for n, metric, label_a, label_b, pdiff in rows:
            v = _verdict(pdiff, _kind(c))
            where = f"{n}" + (f" with `{label_a}`" if label_a != c["a"] else "")
            verdicts.append(f"says nothing on {where} ({label_a} and {label_b} are identical on every seed)"
                            if v == IDENTICAL else f"{v} on {where} ({_diff_cell(pdiff, _is_percent(metric))})")
        if verdicts:
            L.append(f"* **{c['paper']}: {c['claim']}.** This suite " + "; ".join(verdicts) + ".")
        else:
            L.append(f"* **{c['paper']}: {c['claim']}.** Not tested by the tasks that ran.")
    if any(_verdict(p, _kind(c)) == IDENTICAL for c, rows in claim_rows for *_, p in rows):
        L.append("")
        L.append(f"*{IDENTICAL}*: the two runs of every seed gave the same number, so the comparison says nothing "
                 "about the claim; the task's section says why (typically a method that cannot act on that model "
                 "at its defaults, tested again through its ablation row).")
    L.append("")

    # ---- per task -------------------------------------------------------------------------------------
    for n in ran:
        d = data[n]
        t, runs, methods = d["task"], d["runs"], d["methods"]
        L.append(f"## {n}")
        L.append("")
        if t.description:
            L.append(t.description.strip())
            L.append("")
        if d["cfg"] is not None:
            L.append(f"Settings: {_settings_line(d['cfg'])}. Config `{t.config if not Path(t.config).is_absolute() else Path(t.config).name}`"
                     + (f" with `{' '.join('--set ' + s for s in t.set)}`" if t.set else "") + ".")
            L.append("")
        L.extend(_code_lines(codes[n]))
        task_name = (d["cfg"] or {}).get("task")
        if task_name in DETERMINISM:
            L.append(f"Reproducibility ({task_name}): {DETERMINISM[task_name]}.")
        L.append("")
        seeds = sorted(set(runs["seed"].astype(int)))
        names = [name for name, _ in task_groups(plan, t)] + [f"{n}__{a.name}" for a in t.ablations]
        wall = sum(per_unit.get(name, 0.0) for name in names)
        parallel = len(names) > 1
        cost = (runs.get("train_time_s", pd.Series(dtype=float)).sum() + runs.get("eval_time_s", pd.Series(dtype=float)).sum())
        L.append(f"{len(runs)} runs, seeds {seeds[0]}–{seeds[-1]} ({len(seeds)} seeds). Wall time of this task's "
                 f"compare directories{' (run partly in parallel, summed)' if parallel else ''}: {wall / 60:.1f} min; "
                 f"training + evaluation time summed over its runs: {cost / 60:.1f} min.")
        if d["failed"]:
            L.append("")
            L.append("**Failed runs** (kept out of every statistic): " + "; ".join(
                f"{r['method']} seed {r['seed']}: {r.get('error', '')}" for r in d["failed"].values()))
        L.append("")
        metrics = [m for m in t.metrics if m in runs]
        extra = ["retained_fraction"] if "retained_fraction" in runs and "seen_classes_accuracy" in metrics else []
        header = ["method", "n"]
        for m in metrics:
            header += [f"{m} (%)" if _is_percent(m) else m, f"Δ {m} vs base [95 %]"]
        header += [*(["retained of before"] if extra else []), "verdict (primary)", "time/step × base"]
        L.append("| " + " | ".join(header) + " |")
        L.append("|" + "---|" * len(header))
        base_time = runs[runs["method"] == "base"]["time_per_step"].mean() if "time_per_step" in runs else math.nan
        rows_runs = [(m, runs) for m in methods] + [(f"{a.method} ({a.name})", ar) for a, ar in d["abl"].values()
                                                    if not ar.empty]
        for m, src in rows_runs:
            g = src[src["method"] == m]
            if g.empty:
                continue
            cells = [f"`{m}`", str(len(g))]
            prim = None
            for k, metric in enumerate(metrics):
                pct = _is_percent(metric)
                cells.append(_pm(*mean_std(g[metric].dropna()), pct))
                if m == "base":
                    cells.append("reference")
                    continue
                pdiff = paired(src, m, "base", metric, other=runs)
                cells.append(_diff_cell(pdiff, pct))
                if k == 0:
                    prim = pdiff
            if extra:
                cells.append(_pm(*mean_std(g["retained_fraction"].dropna()), True))
            cells.append("reference" if m == "base" else (prim.verdict if prim is not None else "–"))
            cells.append(f"{g['time_per_step'].mean() / base_time:.2f}" if "time_per_step" in g and base_time > 0 else "–")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        befores = [c for c in runs.columns if c.endswith("_before") or c == "zero_shot_accuracy"]
        if befores:
            L.append("Before fine-tuning (the pre-trained model, the same for every run): " + ", ".join(
                f"{c} {_fmt(runs[c].mean(), _is_percent(c))}{' %' if _is_percent(c) else ''}" for c in befores) + ".")
            L.append("")
        metric = t.metrics[0]
        summ = summarize(runs, metric)
        if not summ.empty and metric in runs:
            png = fig_dir / f"{n}.png"
            plot(runs, summ, png, metric)
            L.append(f"![{n}: {metric}]({fig_dir.name}/{png.name})")
            L.append("")
        per_seed = runs.pivot_table(index="method", columns="seed", values=metric, observed=True)
        L.append(f"<details><summary>{metric} per seed (%)</summary>")
        L.append("")
        L.append("| method | " + " | ".join(str(s) for s in per_seed.columns) + " |")
        L.append("|---|" + "---|" * len(per_seed.columns))
        for m, row in per_seed.iterrows():
            L.append(f"| {m} | " + " | ".join(_fmt(v, _is_percent(metric)) for v in row.to_numpy()) + " |")
        L.append("")
        L.append("</details>")
        L.append("")

    # ---- cost per run ------------------------------------------------------------------------------------
    if ran:
        L.append("## Cost per run")
        L.append("")
        L.append("Mean over the runs of each task and method (seconds, on the shared machine; training excludes "
                 "evaluation).")
        L.append("")
        L.append("| task | method | runs | time per step (s) | training (s) | evaluation (s) |")
        L.append("|---|---|---|---|---|---|")
        for n in ran:
            d = data[n]
            frames = [(m, d["runs"]) for m in d["methods"]] + [(f"{a.method} ({a.name})", ar)
                                                               for a, ar in d["abl"].values() if not ar.empty]
            for m, src in frames:
                g = src[src["method"] == m]
                if g.empty:
                    continue
                cell = lambda c, g=g: f"{g[c].mean():.2f}" if c in g and g[c].notna().any() else "–"  # noqa: E731
                L.append(f"| {n} | `{m}` | {len(g)} | {cell('time_per_step')} | {cell('train_time_s')} | "
                         f"{cell('eval_time_s')} |")
        L.append("")

    if cut:
        L.append("## Not run by this plan")
        L.append("")
        for t in cut:
            L.append(f"* **{t.name}** (`{Path(t.config).name}`): {t.skip_reason or 'no finished runs yet'}. Run it with "
                     f"`flatpeft suite {plan.path or 'PLAN'} --tasks {t.name}`.")
        L.append("")
    write_atomic(page, "\n".join(L).rstrip() + "\n")
    return page
