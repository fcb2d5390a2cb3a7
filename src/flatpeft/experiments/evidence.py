"""The suite's machine-readable results: every number of the results page, gathered from the runs into one
JSON-serialisable mapping (written as ``results.json`` beside the page, which is rendered from it alone).

Stations: the runs' ``eval.json`` / ``metrics.jsonl`` (only runs whose recorded settings and data are the planned
ones, :func:`unit_runs`) -> :func:`selections` (validation grid, selected settings) and :func:`collect` (per task:
anchors, per-seed test metrics, paired differences to ``base``, the fraction curve, the trade-off curves; the
claims; code, machine and wall time) -> ``results.json`` -> :mod:`flatpeft.experiments.suite_page`.

Statistics are :func:`flatpeft.experiments.stats.paired_difference` (paired over the seeds both arms have,
95 % Student-t interval); a paired difference is stored as ``{"n", "mean", "std", "ci_low", "ci_high",
"verdict"}``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .plan import grid_points, selection_units, units
from .stats import mean_std, paired_difference

__all__ = ["DETERMINISM", "unit_wall", "unit_runs", "metric_info", "selections", "selected_settings", "collect", "paired", "interpolate_at", "MARGIN",
           "RESULTS_VERSION"]

#: tolerance of the "matches" claims and of "refutes a gain of ... or more" (fractions: 0.01 = 1 pp)
MARGIN = 0.01
#: layout version of ``results.json``
RESULTS_VERSION = 1


def _num(v: Any) -> float | None:
    """A finite float, or ``None`` (strict JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def paired(a: dict[int, float], b: dict[int, float], kind: str = "better") -> dict[str, Any] | None:
    """Paired difference ``a - b`` over the seeds both have (``{seed: value}`` each), with the verdict of a claim
    of ``kind`` (:func:`claim_verdict`); ``None`` when no seed is shared."""
    common = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
    if not common:
        return None
    d = paired_difference([a[s] for s in common], [b[s] for s in common])
    out = {"n": d.n, "mean": _num(d.mean), "std": _num(d.std), "ci_low": _num(d.ci_low), "ci_high": _num(d.ci_high),
           "verdict": d.verdict, "seeds": common}
    out["claim"] = claim_verdict(out, kind)
    return out


#: verdict of a pair of arms that gave the same number on every seed: no evidence either way
IDENTICAL = "not tested: identical on every seed"


def claim_verdict(d: dict[str, Any] | None, kind: str) -> str:
    """``supports`` / ``refutes`` / ``refutes a gain of 1 pp or more`` / ``cannot resolve`` for a claim of ``kind``
    (``better``, ``forgets-less``: a better value of a retained metric; ``match``: not worse by more than
    :data:`MARGIN`) from a paired difference; :data:`IDENTICAL` when both arms gave the same number on every seed."""
    if d is None or d["n"] < 2 or d["ci_low"] is None:
        return "cannot resolve (too few seeds)"
    if d["mean"] == 0 and (d["std"] or 0) == 0:
        return IDENTICAL
    lo, hi = d["ci_low"], d["ci_high"]
    if kind == "match":
        if hi < 0 and lo < -MARGIN:
            return "refutes"
        return "supports" if lo > -MARGIN else "cannot resolve"
    if lo > 0:
        return "supports"
    if hi < 0:
        return "refutes"
    if hi < MARGIN:
        return f"refutes a gain of {100 * MARGIN:.0f} pp or more"
    return "cannot resolve"


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





def _trained(inv: dict[str, Any]) -> bool:
    """Whether a suite invocation trained any run. A page rebuild, or a resume that found every run finished,
    adds no run time and must not dilute the load figures. In records written before units logged ``trained``,
    a unit counts as training when it took 5 s or more (a resume that finds its runs finished takes about 3 s)."""
    if not inv.get("train"):
        return False
    return any(u["trained"] > 0 if "trained" in u else float(u.get("wall_s", 0)) >= 5.0 for u in inv["units"])


def unit_wall(log: dict[str, Any]) -> tuple[dict[str, float], float, list[float], dict[str, Any], int]:
    """Wall seconds per unit (summed over invocations), total suite wall, load samples, last machine, and the
    number of invocations that trained."""
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
    return per, total, loads, machine, len(spans)





# ---- runs ---------------------------------------------------------------------------------------------------------
def unit_runs(root: Path, unit: Any) -> list[tuple[str, int, Path]]:
    """``(method, seed, run dir)`` of the finished runs of one unit whose recorded settings are the unit's and whose
    data are the current files (compare's check), whatever code trained them (the page names it)."""
    from .config import load_config
    from .runner import _run_config, _valid_runs, _with_method, run_dir_for

    d = Path(root) / unit.name
    if not d.is_dir() or unit.pending:
        return []
    cfg = load_config(unit.task.config, unit.overrides)
    plan = {(m, s): _run_config(_with_method(cfg, m), s, run_dir_for(d, m, s)) for s in unit.seeds for m in unit.methods}
    return _valid_runs(plan, d, keep_other_code=True, strict_data=False)


def _eval_rows(runs: list[tuple[str, int, Path]]) -> dict[int, dict[str, Any]]:
    """``{seed: eval.json numbers + code}`` of the runs of one arm."""
    from .results import _is_setting

    out = {}
    for _, seed, run in runs:
        data = json.loads((run / "eval.json").read_text())
        row = {k: _num(v) for k, v in data.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not _is_setting(k)}
        row["_code"] = data.get("code")
        row["_run"] = str(run)
        out[int(seed)] = row
    return out


def _curve(run: Path, downstream: str, retained: str, start: Sequence[str] = ()) -> list[list[float]]:
    """``[[step, downstream, retained], ...]`` from the validation records of a run's ``metrics.jsonl``; with
    ``start`` (two metric names of those records: the model before fine-tuning), a step-0 point first."""
    path = run / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if downstream in rec and retained in rec:
                if not out and len(start) == 2 and all(rec.get(k) is not None for k in start):
                    out.append([0.0, float(rec[start[0]]), float(rec[start[1]])])
                out.append([float(rec["step"]), float(rec[downstream]), float(rec[retained])])
    return out


def interpolate_at(curve: Sequence[Sequence[float]], level: float) -> float | None:
    """The retained value where a ``[[step, downstream, retained], ...]`` curve first reaches ``downstream =
    level`` (linear between the two records around the crossing; the first record when it already lies at or
    above the level); ``None`` when the curve never reaches it."""
    prev = None
    for _, down, ret in curve:
        if down >= level:
            if prev is None or prev[0] >= level:
                return float(ret)
            r0, t = prev[1], (level - prev[0]) / (down - prev[0])
            return float(r0 + t * (ret - r0))
        prev = (down, ret)
    return None


# ---- selection ----------------------------------------------------------------------------------------------------
def selections(plan: Any, task: Any, root: Path) -> dict[str, dict[str, Any]]:
    """Per method of ``task``'s grid: its points (label, overrides, validation score per seed, mean, n), the
    selected point (highest mean; ties to the point listed first) and whether every point has every seed."""

    if task.select is None:
        return {}
    metric = "val_" + (task.select.metric or task.metrics[0])
    out: dict[str, dict[str, Any]] = {}
    for u in selection_units(plan, task):
        rows = _eval_rows(unit_runs(root, u))
        scores = {s: r.get(metric) for s, r in rows.items()}
        failed = sorted({int(f["seed"]) for f in _failed_runs(root, [u.name])} - set(scores))
        done = set(scores) | set(failed) >= set(u.seeds) and None not in scores.values()
        point = {"label": u.point, "set": _point_sets(task, u), "scores": scores, "failed": failed,
                 "mean": _num(np.mean(list(scores.values()))) if scores and not failed else None,
                 "n": len(scores), "complete": done}
        extra = {k: _num(np.mean([r[k] for r in rows.values() if r.get(k) is not None]))
                 for k in ("val_accuracy", "val_seen_classes_accuracy", "val_seen_classes_accuracy_before")
                 if any(r.get(k) is not None for r in rows.values())}
        point["val_means"] = extra
        out.setdefault(u.label, {"metric": metric, "points": [], "seeds": u.seeds})["points"].append(point)
    for sel in out.values():
        sel["complete"] = all(p["complete"] for p in sel["points"])
        best = None
        for p in sel["points"]:  # ties go to the point listed first; a point with a diverged run is never chosen
            if p["complete"] and p["mean"] is not None and (best is None or p["mean"] > best["mean"]):
                best = p
        sel["selected"] = best["label"] if (best and sel["complete"]) else None
        sel["set"] = best["set"] if (best and sel["complete"]) else None
    return out


def _point_sets(task: Any, unit: Any) -> list[str]:

    return dict(grid_points(task.select.grid[unit.label]))[unit.point]


def selected_settings(plan: Any, root: Path, only: Sequence[str] | None = None
                      ) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[str]]]:
    """``({task: {method: overrides}}, {task: [what is missing]})`` of the plan's finished selections."""
    chosen: dict[str, dict[str, list[str]]] = {}
    missing: dict[str, list[str]] = {}
    for t in plan.tasks:
        if t.select is None or (only is not None and t.name not in only) or (only is None and not t.enabled):
            continue
        for m, sel in selections(plan, t, root).items():
            if sel["selected"] is None:
                todo = [p["label"] for p in sel["points"] if not p["complete"]]
                missing.setdefault(t.name, []).append(f"{m}: grid point(s) {', '.join(todo)} without every "
                                                      "validation seed")
            else:
                chosen.setdefault(t.name, {})[m] = sel["set"]
    return chosen, missing


# ---- everything ---------------------------------------------------------------------------------------------------
def _arm(root: Path, unit: Any) -> dict[str, Any]:
    """One arm of a task (a unit's single method, or one method of a grouped unit is split by the caller)."""
    return {"unit": unit.name, "set": list(unit.overrides), "runs": unit_runs(root, unit)}


def _values(seeds: dict[int, dict[str, Any]], metric: str) -> dict[int, float]:
    return {s: r[metric] for s, r in seeds.items() if r.get(metric) is not None}


def _summary(values: dict[int, float]) -> dict[str, Any]:
    m, sd = mean_std(list(values.values()))
    return {"mean": _num(m), "std": _num(sd), "n": len(values)}


def _task_arms(plan: Any, task: Any, root: Path, chosen: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """``{label: {"method", "unit", "set", "phase", "seeds": {seed: numbers}}}`` of the task's test arms (main
    comparison, ablations, fraction curve)."""

    arms: dict[str, dict[str, Any]] = {}
    for u in units(plan, [task.name], {task.name: chosen}, phases=["test", "fraction"]):
        runs = unit_runs(root, u)
        for m in u.methods:
            label = u.label or m if len(u.methods) == 1 else m
            rows = _eval_rows([r for r in runs if r[0] == m])
            arms[label] = {"method": m, "unit": u.name, "set": list(u.overrides), "phase": u.phase,
                           "ablation": u.ablation.name if u.ablation else None, "pending": u.pending, "seeds": rows}
    return arms


def _anchors(base: dict[int, dict[str, Any]], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """``{anchor: {metric: summary, "seeds": {metric: {seed: v}}}}`` from base's ``anchor_<name>_<metric>``."""
    from .anchors import ANCHOR_NAMES

    out: dict[str, dict[str, Any]] = {}
    for name in ANCHOR_NAMES:
        per = {m: _values(base, f"anchor_{name}_{m}") for m in metrics}
        per = {m: v for m, v in per.items() if v}
        if per:
            out[name] = {"metrics": {m: _summary(v) for m, v in per.items()}, "seeds": per}
    return out


def _tradeoff(task: Any, arms: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Per test arm the learning-vs-forgetting curve of every seed, and the retained metric at matched downstream
    levels (paired over seeds against ``base``)."""
    tr = task.tradeoff
    if tr is None:
        return None
    curves = {label: {s: _curve(Path(r["_run"]), tr.downstream, tr.retained, tr.start) for s, r in arm["seeds"].items()}
              for label, arm in arms.items() if arm["phase"] == "test"}
    curves = {k: {s: c for s, c in v.items() if c} for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    levels = list(tr.levels)
    if not levels and curves.get("base"):  # default: where base ends on average
        levels = [float(np.mean([c[-1][1] for c in curves["base"].values()]))]
    at = {}
    for level in levels:
        vals = {label: {s: interpolate_at(c, level) for s, c in per.items()} for label, per in curves.items()}
        vals = {label: {s: v for s, v in per.items() if v is not None} for label, per in vals.items()}
        at[f"{level:.4g}"] = {"level": level, "values": vals,
                              "vs_base": {label: paired(v, vals.get("base", {}), "forgets-less")
                                          for label, v in vals.items() if label != "base"}}
    return {"downstream": tr.downstream, "retained": tr.retained, "curves": curves, "levels": at}


def _fraction(task: Any, arms: dict[str, dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """FlatPO's fraction curve: per fraction the top and random arms, top − random, and top-f − top-100 %."""
    fc = task.fraction
    if fc is None:
        return None
    rows = []
    top_full = None
    for arm in arms.values():
        if arm["phase"] == "fraction" and "method.fraction=1.0" in arm["set"]:
            top_full = _values(arm["seeds"], metric)
    base = _values(arms.get("base", {}).get("seeds", {}), metric)
    for f in fc.fractions:
        row: dict[str, Any] = {"fraction": f}
        for pick in ("topk", "random"):
            arm = next((a for a in arms.values() if a["phase"] == "fraction"
                        and f"method.fraction={f}" in a["set"] and f"method.selection={pick}" in a["set"]), None)
            if arm is not None:
                v = _values(arm["seeds"], metric)
                row[pick] = {**_summary(v), "vs_base": paired(v, base)}
        if "topk" in row and "random" in row:
            row["top_minus_random"] = paired(_values(_arm_by(arms, f, "topk")["seeds"], metric),
                                             _values(_arm_by(arms, f, "random")["seeds"], metric))
        if "topk" in row and top_full is not None and f < 1:
            row["top_minus_full"] = paired(_values(_arm_by(arms, f, "topk")["seeds"], metric), top_full)
        rows.append(row)
    return {"method": fc.method, "metric": metric, "rows": rows}


def _arm_by(arms: dict[str, dict[str, Any]], f: float, pick: str) -> dict[str, Any]:
    return next(a for a in arms.values() if a["phase"] == "fraction" and f"method.fraction={f}" in a["set"]
                and f"method.selection={pick}" in a["set"])


def _code_groups(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """``{code label: {arm: [seeds]}}`` of every run shown for a task."""
    from .provenance import code_label

    out: dict[str, dict[str, list[int]]] = {}
    for label, arm in arms.items():
        for s, r in sorted(arm["seeds"].items()):
            out.setdefault(code_label(r.get("_code")), {}).setdefault(label, []).append(s)
    return out


def _claims(plan: Any, tasks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every claim of the plan tested on every task that has both arms and the metric (and through each
    ablation of the claim's first method)."""
    rows = []
    for c in plan.plan_claims():
        for name, t in tasks.items():
            metric = t["metrics"][0] if c["metric"] == "primary" else c["metric"]
            if metric not in t["metrics"] or c["b"] not in t["arms"]:
                continue
            b = _values(t["arms"][c["b"]]["seeds"], metric)
            for label, arm in t["arms"].items():
                if arm["phase"] != "test" or arm["method"] != c["a"] or label == c["b"]:
                    continue
                d = paired(_values(arm["seeds"], metric), b, c["kind"])
                if d is not None:
                    rows.append({"id": c["id"], "paper": c["paper"], "claim": c["claim"], "kind": c["kind"],
                                 "task": name, "metric": metric, "a": label, "b": c["b"], "diff": d,
                                 "verdict": d["claim"]})
    return rows


def metric_info(task_name: str | None) -> dict[str, dict[str, Any]]:
    """``{metric: {"percent", "before", "higher_is_better"}}`` as the task declares them (:class:`Task.metrics
    <flatpeft.experiments.tasks.Metric>`), plus ``<metric>_retained`` for each metric retained against a before
    value; empty for an unknown task."""
    import dataclasses

    from .tasks import get_task

    if not task_name:
        return {}
    try:
        declared = get_task(task_name).metrics
    except ValueError:
        return {}
    out = {name: dataclasses.asdict(m) for name, m in declared.items()}
    for name, m in declared.items():
        if m.before:
            out[f"{name}_retained"] = {"percent": True, "before": None, "higher_is_better": m.higher_is_better}
    return out


def _add_retained(arms: dict[str, dict[str, Any]], metrics: list[str], info: dict[str, dict[str, Any]]) -> list[str]:
    """Add ``<metric>_retained = metric / before`` to every run of every arm for the task's metrics retained against
    a before value (the share of the pre-fine-tuning skill kept); returns the names added."""
    added = []
    for m in metrics:
        before = (info.get(m) or {}).get("before")
        if not before:
            continue
        for arm in arms.values():
            for row in arm["seeds"].values():
                if row.get(m) is not None and row.get(before):
                    row[f"{m}_retained"] = row[m] / row[before]
        added.append(f"{m}_retained")
    return added


def _public(arms: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Arms without the private ``_run`` / ``_code`` entries (the code is summarised per task)."""
    return {label: {**{k: v for k, v in arm.items() if k != "seeds"},
                    "seeds": {str(s): {k: v for k, v in r.items() if not k.startswith("_")}
                              for s, r in sorted(arm["seeds"].items())}}
            for label, arm in arms.items()}


def collect(plan: Any, root: Path, log: dict[str, Any]) -> dict[str, Any]:
    """The whole ``results.json`` mapping of a plan's runs under ``root`` (see the module docstring)."""
    from .config import read_config_mapping
    from .provenance import code_label, code_record

    per_unit, total_wall, loads, machine, invocations = unit_wall(log)
    out: dict[str, Any] = {
        "version": RESULTS_VERSION, "plan": plan.path, "output_dir": plan.output_dir,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_record(), "code_label": code_label(code_record()), "machine": machine,
        "wall": {"total_s": total_wall, "invocations": invocations, "per_unit": per_unit,
                 "load_mean": _num(np.mean(loads[::2])) if loads else None,
                 "load_max": _num(max(loads[1::2])) if loads else None,
                 "jobs": log["invocations"][-1].get("jobs") if log.get("invocations") else None,
                 "threads": log["invocations"][-1].get("threads") if log.get("invocations") else None},
        "margin": MARGIN, "notes": plan.notes, "tasks": {}, "not_run": []}
    all_code: dict[str, int] = {}
    private: dict[str, dict[str, Any]] = {}
    for t in plan.tasks:
        sel = selections(plan, t, root)
        chosen = {m: s["set"] for m, s in sel.items() if s["set"] is not None}
        arms = _task_arms(plan, t, root, chosen)
        names = {a["unit"] for a in arms.values()} | {f"{t.name}__select__{m}__{p['label']}"
                                                      for m, s in sel.items() for p in s["points"]}
        failed = _failed_runs(root, sorted(names))  # read (and a damaged record refused) even before any run finished
        if not any(a["seeds"] for a in arms.values()) and not any(p["n"] for s in sel.values() for p in s["points"]):
            out["not_run"].append({"task": t.name, "config": t.config, "reason": t.skip_reason or "no finished runs yet"})
            continue
        metrics = list(t.metrics)
        cfg_path = next((root / a["unit"] / "compare_config.yaml" for a in arms.values()
                         if (root / a["unit"] / "compare_config.yaml").is_file()), None)
        cfg = read_config_mapping(cfg_path) if cfg_path is not None else None
        info = metric_info((cfg or {}).get("task"))
        retained = _add_retained(arms, metrics, info)
        metrics += [r for r in retained if r not in metrics]
        base = arms.get("base", {}).get("seeds", {})
        comparisons = {label: {m: paired(_values(arm["seeds"], m), _values(base, m)) for m in metrics}
                       for label, arm in arms.items() if label != "base"}
        anchors = _anchors(base, metrics)
        primary = metrics[0]
        probe = anchors.get("probe", {}).get("seeds", {}).get(primary)
        anchor_check = None
        if probe:
            d = paired(_values(base, primary), probe)
            anchor_check = {"metric": primary, "base_minus_probe": d,
                            "beats_probe": bool(d and d["ci_low"] is not None and d["ci_low"] > 0)}
        codes = _code_groups(arms)
        for label, per in codes.items():
            all_code[label] = all_code.get(label, 0) + sum(len(v) for v in per.values())
        task_name = (cfg or {}).get("task")
        out["tasks"][t.name] = {
            "config": t.config, "set": list(t.set), "description": t.description, "metrics": metrics,
            "metric_info": info,
            "settings": cfg, "task": task_name, "determinism": DETERMINISM.get(task_name),
            "selection": sel, "anchors": {k: v["metrics"] for k, v in anchors.items()}, "anchor_check": anchor_check,
            "arms": _public(arms), "comparisons": comparisons,
            "fraction": _fraction(t, arms, primary), "tradeoff": _tradeoff(t, arms),
            "code": codes, "wall_s": sum(per_unit.get(n, 0.0) for n in names),
            "failed": failed}
        private[t.name] = {"metrics": metrics, "arms": arms}
    out["claims"] = _claims(plan, private)
    out["code_of_runs"] = all_code
    return out


def _failed_runs(root: Path, units: list[str]) -> list[dict[str, Any]]:
    """The failed runs the units' ``compare_plan.json`` record; a damaged file is an error naming it."""
    rows = []
    for unit in units:
        path = root / unit / "compare_plan.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            data = err
        if not isinstance(data, dict) or not isinstance(data.get("failed") or {}, dict):
            raise ValueError(f"{path}: damaged (not the compare plan flatpeft wrote: {str(data)[:80]}); run the "
                             "suite again to rewrite it (its compare directory resumes), or move it away")
        rows += [{**r, "unit": unit} for r in (data.get("failed") or {}).values()]
    return rows
