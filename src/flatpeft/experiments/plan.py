"""A suite plan as data: tasks, their selection grids, fraction curves, trade-off curves and ablations, the claims
the page tests, and the compare directories ("units") a plan resolves to.

Read by the suite's runner (:mod:`flatpeft.experiments.suite`), by the results collector
(:mod:`flatpeft.experiments.evidence`) and by the reproduction check; it imports none of them. :func:`load_plan`
checks the whole file (unknown keys, types, names that could leave the output directory, claims without a valid
``kind``) and names the file and key of every error.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["SuitePlan", "SuiteTask", "Ablation", "Selection", "FractionCurve", "Tradeoff", "Unit", "load_plan",
           "units", "unit_config", "selection_units", "grid_points", "task_groups", "unit_dirs", "page_path", "CLAIMS",
           "DEFAULT_METHODS"]

DEFAULT_METHODS = ("base", "sam", "flatpo", "eflat-lora", "spider", "flatpo-lagged")


@dataclass
class Ablation:
    """One method with extra settings, paired with the task's ``base`` runs (e.g. FlatPO with ``scope=all``)."""

    name: str
    method: str
    set: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Selection:
    """Hyper-parameter selection of a task on validation data only (issue: "tuning is part of the instrument").

    For every method with a ``grid`` entry (``{key: [values]}``, config keys as ``--set`` takes them, e.g.
    ``method.rho`` or ``train.lr``; several keys give their product), every grid point trains with the validation
    ``seeds`` (never the test seeds) and evaluates only the validation split (``train.eval_splits=[val]``, plus the
    ``set`` overrides, e.g. a smaller evaluation); the test split is never evaluated. The selected point maximises
    the mean over those seeds of ``val_<metric>`` (default: the task's primary metric); ties go to the point listed
    first (list radii from small to large: ties go to the smaller radius). A method without a grid runs at the
    task's settings."""

    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    seeds: int | list[int] = field(default_factory=lambda: [100, 101])
    set: list[str] = field(default_factory=list)
    metric: str | None = None

    def seed_list(self) -> list[int]:
        return list(range(100, 100 + int(self.seeds))) if isinstance(self.seeds, int) else [int(s) for s in self.seeds]


@dataclass
class FractionCurve:
    """FlatPO's question asked directly: ``method`` (FlatPO) perturbing the top fraction ``f`` of the adapter
    tensors against a random fraction ``f`` (``method.selection=random``), for every ``f`` in ``fractions``, at the
    method's selected setting, with the task's test seeds (paired with every other run of the task). At ``f = 1``
    both select every tensor, so only the top arm runs."""

    fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    method: str = "flatpo"
    set: list[str] = field(default_factory=list)


@dataclass
class Tradeoff:
    """A learning-vs-forgetting curve per run, read from its validation records along training
    (``train.val_eval_steps``): ``downstream`` and ``retained`` name two validation metrics (``val_`` prefixed, as
    the run's ``metrics.jsonl`` holds them); ``levels`` are the downstream values at which the methods are compared
    (the retained metric interpolated on each seed's curve, paired over seeds)."""

    downstream: str = "val_accuracy"
    retained: str = "val_seen_classes_accuracy"
    levels: list[float] = field(default_factory=list)
    start: list[str] = field(default_factory=list)   # [downstream, retained] of the model before fine-tuning (step 0)


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
    select: Selection | None = None           # tune on validation first; every method then its own directory
    fraction: FractionCurve | None = None     # FlatPO's fraction curve (needs the method's selection)
    tradeoff: Tradeoff | None = None          # learning-vs-forgetting curves from the validation records


@dataclass
class SuitePlan:
    """The whole plan (``configs/suite.yaml``)."""

    tasks: list[SuiteTask]
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int | list[int] = 10
    output_dir: str = "runs/suite"
    page: str | None = None                  # default: <output_dir>/results.md
    threads: int = 1
    jobs: int = 1
    notes: str = ""
    claims: list[dict[str, str]] | None = None   # default: CLAIMS
    path: str = ""

    def plan_claims(self) -> list[dict[str, str]]:
        return list(CLAIMS if self.claims is None else self.claims)

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


#: A task or ablation name: it becomes a directory name under ``output_dir``, so nothing that could leave it.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _check_name(value: Any, where: str) -> None:
    """Refuse a name that is not a plain identifier (``..``, a slash, an absolute path, empty)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{where}: {value!r} is not a plain name (letters, digits, '_', '-', '.'; it names a "
                         "directory under output_dir, so no '/', '..' or leading '.')")


def _check_list(value: Any, where: str, item: type = str) -> None:
    """Refuse a value that is not a list of ``item`` (a string would be split into characters)."""
    if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: expected a list of {item.__name__}s, got {value!r}")


def _check_int(value: Any, where: str, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{where}: expected an integer >= {low}, got {value!r}")


def _check_seeds(value: Any, where: str) -> None:
    if isinstance(value, list):
        _check_list(value, where, int)
        if not value or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"{where}: expected distinct seeds >= 0, got {value!r}")
    else:
        _check_int(value, where, 1)


def _check_types(raw: dict, where: str, spec: dict[str, Callable[[Any, str], None]]) -> None:
    """Check each key of ``raw`` that ``spec`` names with its checker (``where.key`` in the message)."""
    for key, check in spec.items():
        if raw.get(key) is not None:
            check(raw[key], f"{where}: {key}")


def _is_str(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")


def _is_bool(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")


def _check_groups(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of method lists, got {value!r}")
    for i, g in enumerate(value):
        _check_list(g, f"{where}[{i}]")


_PLAN_TYPES: dict[str, Callable[[Any, str], None]] = {
    "methods": _check_list, "seeds": _check_seeds, "output_dir": _is_str, "page": _is_str,
    "threads": lambda v, w: _check_int(v, w, 0), "jobs": lambda v, w: _check_int(v, w, 1), "notes": _is_str}
_TASK_TYPES: dict[str, Callable[[Any, str], None]] = {
    "config": _is_str, "set": _check_list, "methods": _check_list, "seeds": _check_seeds, "metrics": _check_list,
    "groups": _check_groups, "enabled": _is_bool, "skip_reason": _is_str, "description": _is_str}
_ABLATION_TYPES: dict[str, Callable[[Any, str], None]] = {"method": _is_str, "set": _check_list, "note": _is_str}


def _check_grid(value: Any, where: str) -> None:
    """``{method: {config key: [values]}}`` with at least one value per key."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping method -> {{key: [values]}}, got {value!r}")
    for method, keys in value.items():
        if not isinstance(keys, dict) or not keys:
            raise ValueError(f"{where}.{method}: expected a mapping config key -> [values], got {keys!r}")
        for key, values in keys.items():
            if not isinstance(key, str) or "." not in key:
                raise ValueError(f"{where}.{method}: {key!r} is not a config key such as method.rho or train.lr")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}.{method}.{key}: expected a non-empty list of values, got {values!r}")


def _check_numbers(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: expected a non-empty list of numbers, got {value!r}")


def _check_fractions(value: Any, where: str) -> None:
    _check_numbers(value, where)
    if not all(0 < v <= 1 for v in value) or len(set(value)) != len(value):
        raise ValueError(f"{where}: expected distinct fractions in (0, 1], got {value!r}")


_SECTION_TYPES: dict[str, dict[str, Callable[[Any, str], None]]] = {
    "select": {"grid": _check_grid, "seeds": _check_seeds, "set": _check_list, "metric": _is_str},
    "fraction": {"fractions": _check_fractions, "method": _is_str, "set": _check_list},
    "tradeoff": {"downstream": _is_str, "retained": _is_str, "levels": _check_numbers, "start": _check_list},
}
_CLAIM_KEYS = ("id", "kind", "paper", "claim", "metric", "a", "b")


def _parse_section(raw: Any, cls: type, where: str, name: str) -> Any:
    """One optional task section (``select``, ``fraction``, ``tradeoff``) as its dataclass, keys and types checked."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}.{name}: expected a mapping, got {raw!r}")
    _check_keys(raw, cls, f"{where}.{name}")
    _check_types(raw, f"{where}.{name}", _SECTION_TYPES[name])
    return cls(**raw)


def _parse_claims(raw: Any, where: str) -> list[dict[str, str]] | None:
    """The plan's ``claims`` (each with every key of :data:`_CLAIM_KEYS`, an explicit ``kind``)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ValueError(f"{where}: claims: expected a list, got {raw!r}")
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or sorted(c) != sorted(_CLAIM_KEYS) or not all(isinstance(v, str) for v in c.values()):
            raise ValueError(f"{where}: claims[{i}]: each claim needs exactly the string keys {', '.join(_CLAIM_KEYS)}, "
                             f"got {c!r}")
        if c["kind"] not in ("better", "forgets-less", "match"):
            raise ValueError(f"{where}: claims[{i}] ({c['id']}): kind must be better, forgets-less or match, got "
                             f"{c['kind']!r}")
    return raw


def load_plan(path: str | Path) -> SuitePlan:
    """Read and check a plan file, or the built-in plan by name (``suite``): unknown keys, values of the wrong type
    (a string where a list belongs, seeds that are not integers), names that are not plain identifiers and
    duplicate names are errors naming the plan file and the key."""
    from flatpeft.resources import resolve_config_path

    from .config import read_config_mapping

    raw = read_config_mapping(path)
    path = resolve_config_path(path)
    _check_keys(raw, SuitePlan, str(path))
    if not raw.get("tasks") or not isinstance(raw["tasks"], list):
        raise ValueError(f"{path}: a plan needs a non-empty 'tasks' list")
    _check_types(raw, str(path), _PLAN_TYPES)
    tasks = []
    for i, t in enumerate(raw["tasks"]):
        where = f"{path}: tasks[{i}]"
        if not isinstance(t, dict) or "name" not in t or "config" not in t:
            raise ValueError(f"{where}: each task needs 'name' and 'config'")
        _check_keys(t, SuiteTask, where)
        _check_name(t["name"], f"{where}.name")
        _check_types(t, where, _TASK_TYPES)
        abls = []
        if not isinstance(t.get("ablations") or [], list):
            raise ValueError(f"{where}.ablations: expected a list, got {t['ablations']!r}")
        for j, a in enumerate(t.get("ablations") or []):
            if not isinstance(a, dict) or "name" not in a or "method" not in a:
                raise ValueError(f"{where}.ablations[{j}]: each ablation needs 'name' and 'method'")
            _check_keys(a, Ablation, f"{where}.ablations[{j}]")
            _check_name(a["name"], f"{where}.ablations[{j}].name")
            _check_types(a, f"{where}.ablations[{j}]", _ABLATION_TYPES)
            abls.append(Ablation(**a))
        sections = {name: _parse_section(t.get(name), cls, where, name)
                    for name, cls in (("select", Selection), ("fraction", FractionCurve), ("tradeoff", Tradeoff))}
        tasks.append(SuiteTask(**{**t, "ablations": abls, **sections}))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: task names must be unique, got {names}")
    plan = SuitePlan(**{**raw, "tasks": tasks, "claims": _parse_claims(raw.get("claims"), str(path))}, path=str(path))
    dirs = [u.name for u in units(plan, names)]
    clash = sorted({d for d in dirs if dirs.count(d) > 1})
    if clash:
        raise ValueError(f"{path}: two tasks or ablations share the directory {', '.join(clash)}; rename one")
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
    phase: str = "test"       # "select" (validation grid), "test" (the task's table), "fraction" (FlatPO's curve)
    label: str = ""           # how the page names the unit's runs (default: the method)
    point: str = ""           # "select": the grid point (e.g. "rho=0.05")
    pending: bool = False     # its settings wait for a selection that has not finished


def _value_text(value: Any) -> str:
    """A grid value as ``--set`` takes it and as a directory name shows it."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def grid_points(keys: dict[str, list[Any]]) -> list[tuple[str, list[str]]]:
    """``(label, overrides)`` of every point of a grid ``{key: [values]}`` (product, in the order listed):
    ``("rho=0.05", ["method.rho=0.05"])``."""
    import itertools

    names = list(keys)
    out = []
    for values in itertools.product(*(keys[k] for k in names)):
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in zip(names, values))
        out.append((label, [f"{k}={_value_text(v)}" for k, v in zip(names, values)]))
    return out


def selection_units(plan: SuitePlan, task: SuiteTask) -> list[Unit]:
    """The validation units of ``task``'s selection: one compare directory per method and grid point
    (``<task>__select__<method>__<point>``), validation seeds, validation split only."""
    sel = task.select
    if sel is None:
        return []
    extra = [*task.set, *sel.set, "train.eval_splits=[val]", "train.anchors=false"]
    return [Unit(task, f"{task.name}__select__{m}__{label}", [m], sel.seed_list(), [*extra, *sets], phase="select",
                 label=m, point=label)
            for m, keys in sel.grid.items() for label, sets in grid_points(keys)]


def units(plan: SuitePlan, only: Sequence[str] | None = None,
          selected: dict[str, dict[str, list[str]]] | None = None, phases: Sequence[str] | None = None) -> list[Unit]:
    """The compare directories of the plan, in order: a task's selection units, its main comparison, its ablations,
    its fraction curve. ``selected``: ``{task: {method: overrides}}`` of the finished selections (the units that
    need a missing one are marked ``pending``); ``phases``: keep only these phases."""
    out = []
    for t in plan.tasks:
        if only is not None and t.name not in only:
            continue
        if only is None and not t.enabled:
            continue
        seeds = plan.task_seeds(t)
        chosen = (selected or {}).get(t.name, {})

        def sel(method: str, t: SuiteTask = t, chosen: dict[str, list[str]] = chosen) -> tuple[list[str], bool]:
            if t.select is None or method not in t.select.grid:
                return [], False
            return (list(chosen[method]), False) if method in chosen else ([], True)

        found = selection_units(plan, t)
        for name, methods in task_groups(plan, t):
            sets = [sel(m) for m in methods]
            # the anchors are evaluated once per seed, by base's runs when base has a directory of its own
            anchors = ["train.anchors=true"] if methods == ["base"] else []
            found.append(Unit(t, name, methods, seeds, [*t.set, *(x for s, _ in sets for x in s), *anchors],
                              pending=any(p for _, p in sets)))
        for a in t.ablations:
            s, p = sel(a.method)
            found.append(Unit(t, f"{t.name}__{a.name}", [a.method], seeds, [*t.set, *s, *a.set], a,
                              label=f"{a.method} ({a.name})", pending=p))
        if t.fraction is not None:
            fc = t.fraction
            s, p = sel(fc.method)
            for f in fc.fractions:
                for pick in ("topk",) if f >= 1 else ("topk", "random"):
                    found.append(Unit(t, f"{t.name}__fraction__{pick}-{f:g}", [fc.method], seeds,
                                      [*t.set, *s, *fc.set, f"method.fraction={f}", f"method.selection={pick}"],
                                      phase="fraction", label=f"{fc.method} {pick} {100 * f:g} %", pending=p))
        out += [u for u in found if phases is None or u.phase in phases]
    return out


def unit_config(unit: Unit) -> Any:
    """The experiment config of one unit: the task's config with the unit's overrides."""
    from .config import load_config

    return load_config(unit.task.config, unit.overrides)


def task_groups(plan: SuitePlan, task: SuiteTask) -> list[tuple[str, list[str]]]:
    """``(directory name, methods)`` of a task's main comparison: one directory, or one per method group
    (``groups``; the first keeps the task's name, the others are ``<name>__g2``, ...). Seeds pair across them.
    A task with a ``select`` section runs every method in its own directory (``<name>__<method>``)."""
    methods = plan.task_methods(task)
    if task.select is not None:
        return [(f"{task.name}__{m}", [m]) for m in methods]
    if not task.groups:
        return [(task.name, methods)]
    grouped = [m for g in task.groups for m in g]
    if sorted(grouped) != sorted(methods) or len(set(grouped)) != len(grouped):
        raise ValueError(f"task {task.name!r}: groups must split its methods {methods} exactly, got {task.groups}")
    return [(task.name if i == 0 else f"{task.name}__g{i + 1}", list(g)) for i, g in enumerate(task.groups)]


def unit_dirs(plan: SuitePlan, output_dir: str | Path | None = None) -> dict[str, Path]:
    root = Path(output_dir or plan.output_dir).expanduser()
    return {u.name: root / u.name for u in units(plan, [t.name for t in plan.tasks])}


def page_path(plan: SuitePlan, output_dir: str | Path | None = None, page: str | Path | None = None) -> Path:
    """The page to write: ``page``, else the plan's ``page``, else ``<output_dir>/results.md``."""
    root = Path(output_dir or plan.output_dir).expanduser()
    return Path(page or plan.page or root / "results.md").expanduser()


#: The seed papers' claims and how the page tests them: (claim, task filter, metric, method a, method b).
#: The seed papers' claims the page tests. ``kind``: ``better`` (a beats b on ``metric``), ``forgets-less`` (a keeps
#: more of the pre-fine-tuning skill measured by ``metric``: ``better`` on a retained metric) or ``match`` (a is
#: not worse than b by more than the page's margin); the verdict rule is chosen by ``kind``, never by the wording.
CLAIMS: list[dict[str, str]] = [
    {"id": "flatpo-vs-sam", "kind": "better", "paper": "FlatPO",
     "claim": "perturbing only the sharpest 5 % of the adapter tensors generalises better than perturbing all of "
              "them (SAM)", "metric": "accuracy", "a": "flatpo", "b": "sam"},
    {"id": "flatpo-vs-base", "kind": "better", "paper": "FlatPO",
     "claim": "FlatPO improves on plain fine-tuning", "metric": "accuracy", "a": "flatpo", "b": "base"},
    {"id": "eflat-vs-base", "kind": "better", "paper": "EFlat-LoRA / Flat-LoRA",
     "claim": "flatter LoRA (EFlat-LoRA) generalises better than plain LoRA", "metric": "accuracy",
     "a": "eflat-lora", "b": "base"},
    {"id": "spider-forgetting", "kind": "forgets-less", "paper": "SPIDER",
     "claim": "SPIDER forgets less of the pre-fine-tuning skill than plain fine-tuning",
     "metric": "seen_classes_accuracy", "a": "spider", "b": "base"},
    {"id": "spider-downstream", "kind": "match", "paper": "SPIDER",
     "claim": "SPIDER keeps the downstream accuracy of plain fine-tuning (trade-off, not a loss)",
     "metric": "accuracy", "a": "spider", "b": "base"},
    {"id": "flatpo-forgetting", "kind": "forgets-less", "paper": "FlatPO",
     "claim": "FlatPO forgets less of the pre-fine-tuning skill than plain fine-tuning",
     "metric": "seen_classes_accuracy", "a": "flatpo", "b": "base"},
    {"id": "lagged-vs-flatpo", "kind": "match", "paper": "single-pass FlatPO (flatpeft)",
     "claim": "the single-pass lagged FlatPO matches two-pass FlatPO at about the cost of one pass",
     "metric": "accuracy", "a": "flatpo-lagged", "b": "flatpo"},
]
