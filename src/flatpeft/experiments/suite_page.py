"""The results page of ``flatpeft suite`` (``docs/results.md``), rendered from one machine-readable file.

:func:`write_page` gathers every number from the runs once (:func:`flatpeft.experiments.evidence.collect`),
writes it as ``results.json`` beside the page (``<page stem>.json``), reads that file back and renders the page
and its plots from it alone: small renderers, one per section (header, summary with anchors, selected settings,
claims, per task: anchors, validation grid, table, fraction curve, trade-off curve, per-seed values; cost per
run). Nothing on the page is typed in. The page names the code behind every table (the code each run recorded,
:mod:`flatpeft.experiments.provenance`) and states per task whether its runs reproduce bit for bit
(:data:`DETERMINISM`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .results import _is_percent

#: tolerance of the "matches" claims (equivalence): the interval's lower end must be above -MARGIN
from .evidence import DETERMINISM, IDENTICAL, MARGIN, unit_wall  # noqa: F401 - re-exported for readers of the page code

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
        plots = [page.parent / page.stem / f"{t}{kind}.png" for t in tasks
                 for kind in ("", "_selection", "_fraction", "_tradeoff")]
        taken = [str(p) for p in plots if p.exists()]
        if taken:
            raise ValueError(f"page {str(page)!r}: its plots would replace files flatpeft did not write "
                             f"({', '.join(taken[:3])}); set another page (page: / --page), or move them away")
    data = results_path(page)
    if data.exists() and not _is_own_results(data):
        raise ValueError(f"{str(data)!r} exists and is not the results file flatpeft suite writes beside its page "
                         "(a JSON object with 'version' and 'tasks'); flatpeft never overwrites a file it did not "
                         "write: set another page (page: / --page), or move the file away")


def _is_own_results(path: Path) -> bool:
    """Whether ``path`` is a ``results.json`` flatpeft wrote."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "version" in data and "tasks" in data


# ---- formatting ---------------------------------------------------------------------------------------------------
#: ``{metric: {"percent": ...}}`` of every task on the page being rendered (the tasks' declarations, from results.json)
_INFO: dict[str, dict[str, Any]] = {}


def _pct(name: str) -> bool:
    """Whether ``name`` is shown in % (its task's declaration; ``val_`` and ``anchor_<name>_`` prefixes are looked up
    by the plain name; a name no task declares: by its suffix)."""
    plain = name.removeprefix("val_")
    for a in ("majority", "probe", "zero_shot"):
        plain = plain.removeprefix(f"anchor_{a}_")
    return bool(_INFO[plain]["percent"]) if plain in _INFO else _is_percent(plain)


def _fmt(v: float | None, pct: bool, digits: int = 1, sign: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    if pct:
        return f"{100 * v:+.{digits}f}" if sign else f"{100 * v:.{digits}f}"
    return f"{v:+.3g}" if sign else f"{v:.4g}"


def _pm(summary: dict[str, Any] | None, pct: bool) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    sd = summary.get("std")
    return _fmt(summary["mean"], pct) + ("" if sd is None else f" ± {_fmt(sd, pct)}")


def _diff(d: dict[str, Any] | None, pct: bool, n: bool = False) -> str:
    if not d:
        return "–"
    if d["n"] < 2 or d["ci_low"] is None:
        return f"{_fmt(d['mean'], pct, sign=True)} (1 seed)"
    return (f"{_fmt(d['mean'], pct, sign=True)} [{_fmt(d['ci_low'], pct, sign=True)}, "
            f"{_fmt(d['ci_high'], pct, sign=True)}]" + (f" n={d['n']}" if n else ""))


def _values(arm: dict[str, Any], metric: str) -> list[float]:
    return [r[metric] for r in arm["seeds"].values() if r.get(metric) is not None]


def _summary(arm: dict[str, Any], metric: str) -> dict[str, Any] | None:
    v = _values(arm, metric)
    if not v:
        return None
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def _settings_line(cfg: dict[str, Any]) -> str:
    d, p, t = cfg.get("data", {}), cfg.get("peft", {}), cfg.get("train", {})
    parts = [f"task `{cfg.get('task')}`", f"model `{cfg.get('model')}`",
             f"shots {d.get('shots')} per class" if d.get("shots") is not None else "",
             f"max length {d.get('max_length')}" if cfg.get("task") == "text_classification" else "",
             f"{p.get('type')} r={p.get('r')} alpha={p.get('alpha')} on {p.get('target_modules')}",
             f"{t.get('steps')} steps, batch {t.get('batch_size')}, {t.get('base_optimizer')} lr {t.get('lr')}"]
    args = cfg.get("task_args") or {}
    if args:
        parts.append("task_args " + ", ".join(f"{k}={v}" for k, v in args.items()))
    return "; ".join(x for x in parts if x)


def _short(config: str) -> str:
    return Path(config).name if Path(config).is_absolute() else config


# ---- sections -----------------------------------------------------------------------------------------------------
def _header(r: dict[str, Any]) -> list[str]:
    from .provenance import NOT_RECORDED

    plan = r.get("plan") or "PLAN"
    L = [PAGE_TITLE, "",
         f"Produced by `flatpeft suite {plan}` from the runs under `{r['output_dir']}` (finished runs with the same "
         f"settings, data and code are kept, missing ones trained); regenerated {r['generated']}. Every number below "
         "is read from `results.json` beside this page, which the same command writes from the runs' `eval.json` "
         "and `metrics.jsonl` files; nothing is typed in.", ""]
    codes = r.get("code_of_runs") or {}
    text = f"This page was written by {r['code_label']}."
    if list(codes) == [r["code_label"]]:
        text += f" Every run behind its tables ({codes[r['code_label']]}) was trained by that code."
    elif codes:
        text += (f" **Its runs were trained by {len(codes)} code version(s)**: "
                 + "; ".join(f"{k}: {n} run(s)" for k, n in codes.items()) + "."
                 + (" Runs whose code is not recorded may come from any earlier code." if NOT_RECORDED in codes else ""))
    L.append(f"**Code.** {text} `flatpeft suite {plan} --reproduce` retrains one seed per task and method at the "
             "current code and reports the largest difference of each metric (docs/cli.md).")
    m, w = r.get("machine") or {}, r["wall"]
    if m:
        L.append(f"**Machine.** {m.get('cores')} CPU cores ({m.get('cpu')}), "
                 f"{'a GPU was visible' if m.get('gpu') else 'no GPU'}; torch {m.get('torch')}, Python "
                 f"{m.get('python')}.")
    if w.get("invocations"):
        load = (f" Load average (1 min) during the runs: mean {w['load_mean']:.1f}, max {w['load_max']:.1f} on "
                f"{m.get('cores')} cores, so step times are only indicative." if w.get("load_mean") is not None else "")
        L.append(f"**Wall time.** {w['total_s'] / 60:.1f} min over {w['invocations']} invocation(s) of the suite "
                 f"({w.get('jobs')} compare directories in parallel, {w.get('threads')} torch thread(s) each).{load}")
    pct = 100 * r["margin"]
    L += ["", "**Selection rule.** Every tuned hyper-parameter is chosen per task and method on validation data only "
          "(validation seeds distinct from the test seeds; only the validation split is evaluated): the grid point "
          "with the highest mean validation score of the task's primary metric, ties to the point listed first "
          "(the smaller radius). Each method then runs at its selected point with the test seeds.", "",
          "**Verdict rule.** For each method the paired difference to `base` (same seed: same initialisation, "
          "k-shot sample, batch order and dropout stream) is averaged over the seeds both have; the 95 % interval "
          "is d̄ ± t(0.975, n−1)·s/√n. A method is called better / worse only when the interval excludes zero. A "
          "claim is *supported* when the interval of the difference it predicts excludes zero in its direction, "
          f"*refuted* when it excludes zero the other way (or, for a claimed gain, when the whole interval lies "
          f"below +{pct:.0f} pp: *refutes a gain of {pct:.0f} pp or more*), and *cannot resolve* otherwise; a "
          f"*match* claim is supported when the interval's lower end lies above −{pct:.0f} pp. Two arms that gave "
          "the same number on every seed test nothing. Accuracies and F1 in %, differences in percentage points "
          "(pp).", ""]
    if r.get("notes"):
        L += [r["notes"].strip(), ""]
    return L


def _summary_section(r: dict[str, Any]) -> list[str]:
    tasks = r["tasks"]
    labels = list(dict.fromkeys(k for t in tasks.values() for k, a in t["arms"].items()
                                if k != "base" and a["phase"] == "test" and not a.get("ablation")))
    L = ["## Summary", "",
         "Each task's primary metric: `base` and its anchors (mean ± std over the test seeds), then each method's "
         "paired difference to `base` at its selected setting, pp [95 % interval]. A task whose `base` does not beat "
         "its probe anchor is flagged: it measures the shots more than the fine-tuning.", "",
         "| task (primary metric) | majority | probe | zero-shot | base | " + " | ".join(labels) + " |",
         "|---|---|---|---|---|" + "---|" * len(labels)]
    for name, t in tasks.items():
        metric, pct = t["metrics"][0], _pct(t["metrics"][0])
        anchors = [_pm((t["anchors"].get(a) or {}).get(metric), pct) for a in ("majority", "probe", "zero_shot")]
        base = t["arms"].get("base")
        flag = ""
        if t.get("anchor_check") and not t["anchor_check"]["beats_probe"]:
            flag = " ⚑ base does not beat its probe"
        cells = [f"{name} ({metric}){flag}", *anchors,
                 (_pm(_summary(base, metric), pct) + f" (n={len(_values(base, metric))})") if base else "–"]
        for label in labels:
            cells.append(_diff((t["comparisons"].get(label) or {}).get(metric), pct, n=True))
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "Selected settings (validation only; the score is the mean validation value of the primary metric):", "",
          "| task | method | selected | validation score | grid (mean validation score per point) |",
          "|---|---|---|---|---|"]
    for name, t in tasks.items():
        for m, sel in t["selection"].items():
            pct = _pct(sel["metric"])
            best = next((p for p in sel["points"] if p["label"] == sel["selected"]), None)
            grid = ", ".join(f"{p['label']}: {_fmt(p['mean'], pct)}" + ("" if p["complete"] else " (incomplete)")
                             for p in sel["points"])
            L.append(f"| {name} | `{m}` | {sel['selected'] or 'not selected (grid incomplete)'} | "
                     f"{_fmt(best['mean'], pct) if best else '–'} | {grid} |")
    return L + [""]


def _claims_section(r: dict[str, Any]) -> list[str]:
    L = ["## The seed papers' claims", "",
         "| paper | claim | task | metric | difference tested | Δ, pp [95 % interval] (n) | verdict |",
         "|---|---|---|---|---|---|---|"]
    for c in r["claims"]:
        L.append(f"| {c['paper']} | {c['claim']} | {c['task']} | {c['metric']} | {c['a']} − {c['b']} | "
                 f"{_diff(c['diff'], _pct(c['metric']))} ({c['diff']['n']}) | {c['verdict']} |")
    for name, t in r["tasks"].items():
        fr = t.get("fraction")
        if not fr:
            continue
        for row in fr["rows"]:
            if row["fraction"] == 0.05 and row.get("top_minus_full"):
                d = row["top_minus_full"]
                L.append(f"| FlatPO | 5 % > 100 %: perturbing the sharpest 5 % beats perturbing all adapter tensors "
                         f"(fraction curve) | {name} | {fr['metric']} | top 5 % − top 100 % | "
                         f"{_diff(d, _pct(fr['metric']))} ({d['n']}) | {d['claim']} |")
    L += [""]
    if any(c["verdict"] == IDENTICAL for c in r["claims"]):
        L += [f"*{IDENTICAL}*: the two arms gave the same number on every seed (typically a method that cannot act "
              "on that model at its setting), so the row says nothing about the claim.", ""]
    return L


def _anchor_lines(t: dict[str, Any]) -> list[str]:
    if not t["anchors"]:
        return ["Anchors: none recorded (the task reports none, or base's runs did not evaluate them).", ""]
    metrics = t["metrics"]
    L = ["Anchors (test split, the same shots as each seed's runs; mean ± std over seeds):", "",
         "| anchor | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for a, per in t["anchors"].items():
        L.append(f"| {a} | " + " | ".join(_pm(per.get(m), _pct(m)) for m in metrics) + " |")
    ck = t.get("anchor_check")
    if ck:
        d = ck["base_minus_probe"]
        L += ["", f"base − probe on {ck['metric']}: {_diff(d, _pct(ck['metric']))} (n={d['n'] if d else 0}): "
              + ("base beats its probe anchor." if ck["beats_probe"] else
                 "**base does not beat its probe anchor** (flagged: a linear probe on the frozen features of the same "
                 "shots does as well, so the fine-tuning adds nothing measurable here).")]
    return L + [""]


def _selection_lines(name: str, t: dict[str, Any], fig: Path, figdir: str) -> list[str]:
    if not t["selection"]:
        return []
    L = ["Validation grid (mean over the validation seeds; **bold**: selected):", ""]
    for m, sel in t["selection"].items():
        pct = _pct(sel["metric"])
        cells = [(f"**{p['label']}: {_fmt(p['mean'], pct)}**" if p["label"] == sel["selected"] else
                  f"{p['label']}: {_fmt(p['mean'], pct)}") + (f" (n={p['n']})" if not p["complete"] else "")
                 + (f" (diverged: seed {', '.join(map(str, p['failed']))})" if p.get("failed") else "")
                 for p in sel["points"]]
        L.append(f"* `{m}` ({sel['metric']}, seeds {_seeds_text(sel['seeds'])}): " + "; ".join(cells))
    png = fig / f"{name}_selection.png"
    _plot_selection(t, png)
    return L + ["", f"![{name}: validation grid]({figdir}/{png.name})", ""]


def _table_lines(name: str, t: dict[str, Any], fig: Path, figdir: str) -> list[str]:
    metrics = t["metrics"]
    arms = {k: a for k, a in t["arms"].items() if a["phase"] == "test" and a["seeds"]}
    header = ["method", "setting", "n"]
    for m in metrics:
        header += [f"{m} (%)" if _pct(m) else m, f"Δ {m} vs base [95 %]"]
    header += ["verdict (primary)", "time/step × base"]
    L = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_time = _summary(arms["base"], "time_per_step") if "base" in arms else None
    for label, arm in arms.items():
        sel = t["selection"].get(arm["method"], {}).get("selected") if not arm.get("ablation") else None
        cells = [f"`{label}`", sel or "task's", str(len(arm["seeds"]))]
        for m in metrics:
            cells.append(_pm(_summary(arm, m), _pct(m)))
            cells.append("reference" if label == "base" else _diff(t["comparisons"][label].get(m), _pct(m)))
        prim = None if label == "base" else t["comparisons"][label].get(metrics[0])
        cells.append("reference" if label == "base" else (prim["verdict"] if prim else "–"))
        tps = _summary(arm, "time_per_step")
        cells.append(f"{tps['mean'] / base_time['mean']:.2f}" if tps and base_time and base_time["mean"] else "–")
        L.append("| " + " | ".join(cells) + " |")
    png = fig / f"{name}.png"
    _plot_task(t, arms, png)
    L += ["", f"![{name}: {metrics[0]}]({figdir}/{png.name})", "",
          f"<details><summary>{metrics[0]} per seed</summary>", ""]
    seeds = sorted({int(s) for a in arms.values() for s in a["seeds"]})
    L += ["| method | " + " | ".join(map(str, seeds)) + " |", "|---|" + "---|" * len(seeds)]
    for label, arm in arms.items():
        L.append(f"| {label} | " + " | ".join(_fmt(arm["seeds"].get(str(s), {}).get(metrics[0]), _pct(metrics[0]))
                                             for s in seeds) + " |")
    return L + ["", "</details>", ""]


def _fraction_lines(name: str, t: dict[str, Any], fig: Path, figdir: str) -> list[str]:
    fr = t.get("fraction")
    if not fr or not any("topk" in row for row in fr["rows"]):
        return []
    pct = _pct(fr["metric"])
    L = [f"### FlatPO's fraction curve ({name})", "",
         f"`{fr['method']}` at its selected setting perturbing the top fraction f of the adapter tensors (by gradient "
         "norm, every step) against a random fraction f; the test seeds of the task's table, paired. "
         f"{fr['metric']}: mean ± std; differences pp [95 %].", "",
         "| f | top-f | random-f | top − random | top-f − top-100 % | top-f − base |", "|---|---|---|---|---|---|"]
    for row in fr["rows"]:
        top, rnd = row.get("topk"), row.get("random")
        L.append(f"| {100 * row['fraction']:g} % | {_pm(top, pct)} | {_pm(rnd, pct) if rnd else '– (= top)'} | "
                 f"{_diff(row.get('top_minus_random'), pct)} | {_diff(row.get('top_minus_full'), pct)} | "
                 f"{_diff(top.get('vs_base') if top else None, pct)} |")
    five = next((row for row in fr["rows"] if row["fraction"] == 0.05), None)
    if five and five.get("top_minus_full"):
        d = five["top_minus_full"]
        L += ["", f"**5 % > 100 %?** On {name}: top 5 % − top 100 % = {_diff(d, pct)} (n={d['n']}): {d['claim']}."]
    png = fig / f"{name}_fraction.png"
    _plot_fraction(fr, png)
    return L + ["", f"![{name}: fraction curve]({figdir}/{png.name})", ""]


def _tradeoff_lines(name: str, t: dict[str, Any], fig: Path, figdir: str) -> list[str]:
    tr = t.get("tradeoff")
    if not tr or not tr["curves"]:
        return []
    pct = _pct(tr["retained"])
    L = [f"### Learning vs forgetting ({name})", "",
         f"Each test run records `{tr['downstream']}` (downstream skill) and `{tr['retained']}` (the pre-fine-tuning "
         "skill kept) on validation images along training. At each matched downstream level the retained value is "
         "interpolated on every seed's curve (first crossing) and paired against `base`; a seed whose curve never "
         "reaches the level drops out (its n is smaller).", ""]
    for lv in tr["levels"].values():
        L += [f"At {tr['downstream']} = {_fmt(lv['level'], _pct(tr['downstream']))}"
              f"{' %' if _pct(tr['downstream']) else ''}:", "",
              "| method | retained (mean) | n | Δ retained vs base [95 %] | verdict |", "|---|---|---|---|---|"]
        for label, vals in lv["values"].items():
            v = list(vals.values())
            d = lv["vs_base"].get(label)
            L.append(f"| `{label}` | {_fmt(float(np.mean(v)) if v else None, pct)} | {len(v)} | "
                     f"{'reference' if label == 'base' else _diff(d, pct)} | "
                     f"{'reference' if label == 'base' else (d['claim'] if d else '–')} |")
        L.append("")
    winners = sorted({label for lv in tr["levels"].values() for label, d in lv["vs_base"].items()
                      if d and d["claim"] == "supports"})
    losers = sorted({label for lv in tr["levels"].values() for label, d in lv["vs_base"].items()
                     if d and d["claim"] == "refutes"})
    L.append("Whose front dominates: " + (
        f"{', '.join(winners)} keep(s) more than base at matched downstream skill" if winners else
        "no method keeps significantly more than base at matched downstream skill")
        + (f"; {', '.join(losers)} keep(s) less" if losers else "") + ".")
    png = fig / f"{name}_tradeoff.png"
    _plot_tradeoff(t, png)
    return L + ["", f"![{name}: learning vs forgetting]({figdir}/{png.name})", ""]


def _task_section(name: str, t: dict[str, Any], fig: Path, figdir: str) -> list[str]:
    L = [f"## {name}", ""]
    if t.get("description"):
        L += [t["description"].strip(), ""]
    if t.get("settings"):
        L += [f"Settings: {_settings_line(t['settings'])}. Config `{_short(t['config'])}`"
              + (f" with `{' '.join('--set ' + s for s in t['set'])}`" if t["set"] else "") + ".", ""]
    L += _code_lines(t["code"])
    if t.get("determinism"):
        L += [f"Reproducibility ({t['task']}): {t['determinism']}."]
    L += ["", f"Wall time of this task's compare directories (summed; several ran in parallel): "
          f"{t['wall_s'] / 60:.1f} min.", ""]
    if t["failed"]:
        L += ["**Failed runs** (kept out of every statistic): " + "; ".join(
            f"{f.get('method')} seed {f.get('seed')} ({f['unit']}): {f.get('error', '')}" for f in t["failed"]), ""]
    L += _anchor_lines(t)
    L += _selection_lines(name, t, fig, figdir)
    L += _table_lines(name, t, fig, figdir)
    L += _fraction_lines(name, t, fig, figdir)
    L += _tradeoff_lines(name, t, fig, figdir)
    return L


def _code_lines(codes: dict[str, dict[str, list[int]]]) -> list[str]:
    """The code behind one task's table: one version, or each version with the runs it trained."""
    from .provenance import code_label, code_record

    current = code_label(code_record())
    mark = lambda label: " (the code that wrote this page)" if label == current else ""  # noqa: E731
    if len(codes) == 1:
        (label,) = codes
        return [f"Code: every run of this table was trained by {label}{mark(label)}."]
    lines = [f"Code: **the runs of this table were trained by {len(codes)} code versions** (kept with "
             "`--keep-other-code`):"]
    for label, per in codes.items():
        lines.append(f"* {label}{mark(label)}: " + "; ".join(f"{m} seeds {_seeds_text(s)}" for m, s in per.items()))
    return lines + [""]


def _cost_section(r: dict[str, Any]) -> list[str]:
    L = ["## Cost per run", "", "Mean over the runs of each task and arm (seconds; training excludes evaluation).", "",
         "| task | arm | runs | time per step (s) | training (s) | evaluation (s) |", "|---|---|---|---|---|---|"]
    for name, t in r["tasks"].items():
        for label, arm in t["arms"].items():
            if not arm["seeds"]:
                continue
            cell = lambda k, arm=arm: (f"{_summary(arm, k)['mean']:.2f}" if _summary(arm, k) else "–")  # noqa: E731
            L.append(f"| {name} | `{label}` | {len(arm['seeds'])} | {cell('time_per_step')} | {cell('train_time_s')} "
                     f"| {cell('eval_time_s')} |")
    return L + [""]


def render(r: dict[str, Any], fig: Path) -> str:
    """The page (Markdown) of a ``results.json`` mapping; plots go to ``fig`` (``<page stem>/``)."""
    fig.mkdir(parents=True, exist_ok=True)
    _INFO.clear()
    for t in r["tasks"].values():
        _INFO.update(t.get("metric_info") or {})
    L = _header(r)
    if r["tasks"]:
        L += _summary_section(r)
        L += _claims_section(r)
        for name, t in r["tasks"].items():
            L += _task_section(name, t, fig, fig.name)
        L += _cost_section(r)
    if r["not_run"]:
        L += ["## Not run by this plan", ""]
        L += [f"* **{n['task']}** (`{_short(n['config'])}`): {n['reason']}. Run it with "
              f"`flatpeft suite {r.get('plan') or 'PLAN'} --tasks {n['task']}`." for n in r["not_run"]]
        L.append("")
    return "\n".join(L).rstrip() + "\n"


# ---- plots --------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from .rundir import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _pyplot().close(fig)


def _plot_task(t: dict[str, Any], arms: dict[str, dict[str, Any]], path: Path) -> None:
    """Primary metric per arm (seeds as dots, mean as a bar) with the anchors as horizontal lines."""
    plt = _pyplot()
    metric = t["metrics"][0]
    k = 100.0 if _pct(metric) else 1.0
    labels = list(arms)
    fig, ax = plt.subplots(figsize=(3 + 1.1 * len(labels), 4))
    for i, label in enumerate(labels):
        v = np.array(_values(arms[label], metric)) * k
        ax.bar(i, v.mean() if v.size else 0, color="tab:blue", alpha=0.5)
        ax.scatter(np.full(v.size, i), v, color="black", s=10, zorder=3)
    for (a, per), style in zip(t["anchors"].items(), ("--", ":", "-.")):
        if per.get(metric, {}).get("mean") is not None:
            ax.axhline(per[metric]["mean"] * k, color="tab:red", ls=style, lw=1, label=f"{a} anchor")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(f"{metric}{' (%)' if k == 100 else ''} (test)")
    if t["anchors"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_selection(t: dict[str, Any], path: Path) -> None:
    """Validation score per grid point, one panel line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m, sel in t["selection"].items():
        k = 100.0 if _pct(sel["metric"]) else 1.0
        pts = [p for p in sel["points"] if p["mean"] is not None]
        ax.plot(range(len(pts)), [p["mean"] * k for p in pts], "o-", label=m)
        for i, p in enumerate(pts):
            ax.annotate(p["label"].split("=")[-1], (i, p["mean"] * k), fontsize=7, xytext=(2, 3),
                        textcoords="offset points")
    ax.set_xlabel("grid point (in the order listed; value annotated)")
    ax.set_ylabel("mean validation score" + (" (%)" if _pct(t["metrics"][0]) else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_fraction(fr: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    k = 100.0 if _pct(fr["metric"]) else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for pick, color in (("topk", "tab:blue"), ("random", "tab:orange")):
        rows = [r for r in fr["rows"] if pick in r or (pick == "random" and r["fraction"] >= 1 and "topk" in r)]
        xs = [100 * r["fraction"] for r in rows]
        ys = [(r.get(pick) or r["topk"])["mean"] * k for r in rows]
        es = [((r.get(pick) or r["topk"])["std"] or 0) * k for r in rows]
        ax.errorbar(xs, ys, yerr=es, fmt="o-", color=color, capsize=4, label=f"{pick}-f (mean ± std)")
    ax.set_xscale("log")
    ax.set_xlabel("fraction f of adapter tensors perturbed (%)")
    ax.set_ylabel(f"{fr['metric']}{' (%)' if k == 100 else ''} (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_tradeoff(t: dict[str, Any], path: Path) -> None:
    """Left: mean curve along training steps per method; right: the validation grid's end points per method."""
    plt = _pyplot()
    tr = t["tradeoff"]
    kd = 100.0 if _pct(tr["downstream"]) else 1.0
    kr = 100.0 if _pct(tr["retained"]) else 1.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, per in tr["curves"].items():
        curves = [np.array(c) for c in per.values()]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        a1.plot(mean[:, 1] * kd, mean[:, 2] * kr, "o-", ms=3, label=label)
    for lv in tr["levels"].values():
        a1.axvline(lv["level"] * kd, color="grey", ls=":", lw=1)
    a1.set_title("along training steps (mean over test seeds)")
    for m, sel in t["selection"].items():
        pts = [p["val_means"] for p in sel["points"] if tr["downstream"] in p["val_means"]
               and tr["retained"] in p["val_means"]]
        if pts:
            a2.plot([p[tr["downstream"]] * kd for p in pts], [p[tr["retained"]] * kr for p in pts], "o", label=m)
    a2.set_title("across the validation grid (end of training)")
    for ax in (a1, a2):
        ax.set_xlabel(f"{tr['downstream']}{' (%)' if kd == 100 else ''}")
        ax.set_ylabel(f"{tr['retained']}{' (%)' if kr == 100 else ''}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


# ---- the page -----------------------------------------------------------------------------------------------------
def results_path(page: Path) -> Path:
    """``results.json`` beside the page: ``<page stem>.json``."""
    return Path(page).with_suffix(".json")


def write_page(plan, root: Path, page: Path, log: dict[str, Any]) -> Path:
    """Collect the runs under ``root`` into ``results.json`` (beside ``page``), then render ``page`` and its plots
    (``<page stem>/``) from that file alone (refused by :func:`check_page` where a file flatpeft did not write
    would be replaced)."""
    from .evidence import collect
    from .rundir import write_atomic

    page = Path(page)
    check_page(page, [t.name for t in plan.tasks])
    results = collect(plan, root, log)
    data = results_path(page)
    write_atomic(data, json.dumps(results, indent=1, allow_nan=False) + "\n")
    write_atomic(page, render(json.loads(data.read_text()), page.parent / page.stem))
    return page
