"""Typed experiment configuration, read from YAML.

One experiment is one :class:`ExperimentConfig`::

    task: text_classification      # registered task name
    model: builtin:minilm          # HF hub name, local directory, or builtin:<name>
    data: {train: PATH, test: PATH, text_column: text, label_column: label, shots: 16}
    peft: {type: lora, r: 8, alpha: 16, dropout: 0.0, target_modules: [query, value]}
    method: {name: flatpo, rho: 0.05, fraction: 0.05}   # any create_optimizer keyword
    train: {steps: 200, lr: 5.0e-4, batch_size: 16, seed: 0}
    task_args: {}                  # validated by the task's own dataclass
    output_dir: runs/example

Every field has a default and a help text (``field(metadata={"help": ...})``, the peft convention);
unknown keys are rejected with the key's name and the valid ones (litgpt / peft style, never silently
dropped). YAML is read safely with YAML 1.2 core-schema scalars (:func:`safe_load_yaml`: ``010`` is 10, ``1:30``
and ``yes`` are strings), a key given twice is an error and alias expansion is bounded; error messages show
values cut to 200 characters. ``--set a.b=value`` overrides are applied to the raw mapping *before*
validation, so they are checked exactly like keys in the file. :func:`config_to_dict` and :func:`config_from_dict` round-trip.

Paths: ``data.train`` / ``data.test`` are a file path (CSV, JSONL/JSON, Parquet) or a built-in reference
``builtin:<dataset>/<split>`` (e.g. ``builtin:finefoods/train``, resolved by :func:`resolve_data_path`
through :mod:`flatpeft.assets`). Relative paths are relative to the current working directory; the runner
writes them absolute into the run directory's ``config.yaml`` (:func:`absolutize_paths`) so a run can be
evaluated from anywhere. ``model`` is a hub name, a local directory or ``builtin:minilm`` /
``builtin:smollm2`` (:func:`resolve_model_path`).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from flatpeft._checks import check_seed, short_repr as _short

__all__ = [
    "DataConfig",
    "PeftSettings",
    "TrainConfig",
    "ExperimentConfig",
    "PEFT_TYPES",
    "BUILTIN_PREFIX",
    "load_config",
    "read_config_mapping",
    "read_utf8",
    "missing_keys",
    "check_field_type",
    "resolve_test_ref",
    "safe_load_yaml",
    "save_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "parse_override",
    "parse_dataclass",
    "field_help",
    "config_key_table",
    "resolve_model_path",
    "check_model_ref",
    "dump_yaml",
    "MAX_CONFIG_VALUES",
    "resolve_data_path",
    "absolutize_paths",
]

BUILTIN_PREFIX = "builtin:"
PEFT_TYPES = ("lora", "prefix", "prompt", "none")


#: Implicit resolvers of YAML 1.1 that the loader replaces by the YAML 1.2 core schema's (or drops: timestamps,
#: ``=``): ``010`` is 10, not 8; ``1:30`` is a string, not 90; ``yes`` / ``on`` are strings, not booleans.
_YAML11_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp", "value")}

#: Most values a config may hold once every alias (``*name``) is expanded (a "billion laughs" document is refused).
MAX_CONFIG_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core-schema scalars, refusing duplicate mapping keys.

    Scalars: ``true`` / ``false`` (any case) are booleans, ``[-+]?[0-9]+`` a decimal integer (``010`` is 10),
    ``0o17`` / ``0xff`` octal / hexadecimal integers, ``5e-4`` / ``1.5`` / ``.inf`` / ``.nan`` floats, ``null`` /
    ``~`` / empty null; everything else (``1:30``, ``yes``, ``2024-01-01``, ``1_000``) is a string. A mapping
    that names one key twice is an error naming the key and both lines (YAML 1.1 kept the last one silently).
    """

    yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        """The mapping of ``node``; a key given twice raises ``ConstructorError`` naming it and both lines."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _ConfigYAMLError(f"line {line}: duplicate key {_short(key)} (also on line {seen[key]}); "
                                           "YAML would keep only the last one: give each key once")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _ConfigYAMLError(yaml.YAMLError):
    """A YAML document flatpeft refuses (duplicate keys, too many values through aliases, a bad scalar)."""


def _construct_core_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 core integer: decimal (leading zeros stay decimal), ``0o`` octal or ``0x`` hexadecimal."""
    text = loader.construct_scalar(node)
    try:
        if text[:2] in ("0o", "0x"):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text)
    except ValueError:
        raise _ConfigYAMLError(f"line {node.start_mark.line + 1}: {_short(text)} is not an integer") from None


def _construct_core_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    """A YAML 1.2 core float (``1.5``, ``5e-4``, ``.inf``, ``-.inf``, ``.nan``)."""
    text = loader.construct_scalar(node)
    special = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
    try:
        return special[text.lower()] if text.lower() in special else float(text)
    except ValueError:
        raise _ConfigYAMLError(f"line {node.start_mark.line + 1}: {_short(text)} is not a number") from None


_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_core_float)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded_size(root: yaml.Node, limit: int = MAX_CONFIG_VALUES) -> None:
    """Refuse a document whose aliases expand it beyond ``limit`` values, or that holds a recursive alias.

    Linear in the composed document (each node's expanded size is computed once), so a few hundred bytes of
    nested aliases ("billion laughs") are refused at once instead of being expanded (or printed) in full.
    """
    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            active.discard(id(node))
            size[id(node)] = min(1 + sum(size[id(c)] for c in _children(node)), limit + 1)
            continue
        if id(node) in size:
            continue
        active.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in active:
                raise _ConfigYAMLError(f"line {child.start_mark.line + 1}: an alias refers to a value that "
                                       "contains it (recursive alias)")
            if id(child) not in size:
                stack.append((child, False))
    if size[id(root)] > limit:
        raise _ConfigYAMLError(f"its aliases (*name) expand it to more than {limit} values; flatpeft refuses "
                               "such a document")


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that also quotes strings the loader would read as another type (``0o17``, ``1e5``)."""


for _ch, _resolvers in _Loader.yaml_implicit_resolvers.items():
    for _tag, _rx in _resolvers:
        _Dumper.add_implicit_resolver(_tag, _rx, [_ch])


def dump_yaml(data: Any) -> str:
    """``yaml.safe_dump(data, sort_keys=False)`` that :func:`safe_load_yaml` reads back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` semantics (no object construction) with YAML 1.2 core-schema scalars (``5e-4`` is a
    float, ``010`` is 10, ``1:30`` and ``yes`` are strings), duplicate keys refused and alias expansion bounded
    (:data:`MAX_CONFIG_VALUES`). Errors are ``yaml.YAMLError``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DataConfig:
    """Where the examples come from and how they are sampled and tokenised."""

    train: str = field(default="builtin:finefoods/train", metadata=_help(
        "Training pool: CSV / JSONL / JSON / Parquet file, or builtin:<dataset>/<split>."))
    test: str | None = field(default=None, metadata=_help(
        "Test split (same formats); used only for final evaluation, never for tuning. null: the test split of "
        "the built-in dataset named by data.train (builtin:<dataset>/train -> builtin:<dataset>/test); with "
        "your own data.train and no data.test there is no test set, so train.eval_splits must not contain test."))
    text_column: str = field(default="text", metadata=_help("Column holding the input text."))
    label_column: str = field(default="label", metadata=_help(
        "Column holding the class label (strings or integers, one kind per file; classes are the sorted unique values "
        "of the train pool)."))
    shots: int | None = field(default=16, metadata=_help(
        "Examples per class drawn (with the run seed) from the train pool after the validation split is "
        "carved off; null uses the whole remaining pool."))
    val_size: int = field(default=400, metadata=_help(
        "Size of the fixed validation split carved from the train pool first (seed data.val_seed, "
        "independent of the run seed); 0 disables it."))
    val_seed: int = field(default=1234, metadata=_help(
        "Seed of the validation carve-out (0 .. 2**32 - 1); fixed so every run and method sees the same validation "
        "split."))
    max_length: int = field(default=128, metadata=_help(
        "Tokenizer truncation length (tokens); at most the model's positions (less peft.num_virtual_tokens for "
        "prompt / prefix tuning)."))
    drop_missing: bool = field(default=False, metadata=_help(
        "Rows whose text or label is empty / missing are refused (the error names file, row and column); true "
        "drops them instead and reports how many were dropped."))

    def __post_init__(self) -> None:
        if self.shots is not None and (not isinstance(self.shots, int) or self.shots < 1):
            raise ValueError(f"data.shots must be a positive integer or null, got {_short(self.shots)}")
        if not isinstance(self.val_size, int) or self.val_size < 0:
            raise ValueError(f"data.val_size must be a non-negative integer, got {_short(self.val_size)}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"data.max_length must be a positive integer, got {_short(self.max_length)}")
        check_seed("data.val_seed", self.val_seed)
        for name in ("train", "test", "text_column", "label_column"):
            value = getattr(self, name)
            if (value is not None or name != "test") and (not isinstance(value, str) or not value):
                raise ValueError(f"data.{name} must be a non-empty string, got {_short(value)}")


@dataclass
class PeftSettings:
    """Which parameter-efficient method wraps the model (peft configs underneath)."""

    type: str = field(default="lora", metadata=_help(
        "lora (peft LoraConfig), prefix (PrefixTuningConfig), prompt (PromptTuningConfig) or none (full fine-tuning)."))
    r: int = field(default=8, metadata=_help("LoRA rank r of the update B A (A: r x in, B: out x r)."))
    alpha: float = field(default=16, metadata=_help("LoRA alpha (scale s = alpha / r)."))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout probability."))
    target_modules: list[str] | str | None = field(default_factory=lambda: ["query", "value"], metadata=_help(
        "Module names (or one regex string) LoRA wraps; null lets peft pick its default for the architecture."))
    num_virtual_tokens: int = field(default=10, metadata=_help("Virtual tokens for prefix / prompt tuning."))
    modules_to_save: list[str] | None = field(default=None, metadata=_help(
        "Extra fully trained modules (each name must match a module of the model); null lets the task choose (the "
        "classification head for text_classification)."))

    def __post_init__(self) -> None:
        if self.type not in PEFT_TYPES:
            raise ValueError(f"peft.type must be one of {list(PEFT_TYPES)}, got {_short(self.type)}")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"peft.r must be a positive integer, got {_short(self.r)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {_short(self.dropout)}")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"peft.num_virtual_tokens must be a positive integer, got {_short(self.num_virtual_tokens)}")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = field(default=200, metadata=_help("Optimizer steps (each one batch)."))
    lr: float = field(default=5.0e-4, metadata=_help("Learning rate of the base optimizer (constant)."))
    batch_size: int = field(default=16, metadata=_help("Training batch size."))
    seed: int = field(default=0, metadata=_help(
        "Run seed (0 .. 2**32 - 1): initialisation, k-shot sample, batch order and dropout stream (compare "
        "--seeds N uses train.seed .. train.seed+N-1)."))
    base_optimizer: str = field(default="adamw", metadata=_help(
        "Base optimizer wrapped by the method: adamw, adam or sgd (torch defaults otherwise)."))
    weight_decay: float | None = field(default=None, metadata=_help(
        "Weight decay of the base optimizer; null keeps the torch default (AdamW: 0.01)."))
    log_every: int = field(default=10, metadata=_help(
        "Log loss, lr, perturbation norm and loss gap to metrics.jsonl / TensorBoard every N steps."))
    eval_batch_size: int = field(default=64, metadata=_help("Batch size for evaluation (no grad, dynamic padding)."))
    eval_splits: list[str] = field(default_factory=lambda: ["test", "train"], metadata=_help(
        "Splits evaluated after training: test (reported as accuracy / macro_f1), train, val "
        "(reported as <split>_accuracy / <split>_macro_f1)."))
    val_eval_steps: list[int] = field(default_factory=list, metadata=_help(
        "Evaluate the validation split at these steps during training (val_accuracy / val_macro_f1 lines in "
        "metrics.jsonl and TensorBoard): learning curves for choosing steps and lr without touching the test "
        "split. Not counted in time_per_step."))
    anchors: bool = field(default=False, metadata=_help(
        "Also evaluate the task's anchors on the test split before training (the reference predictors fine-tuning "
        "must beat: majority class, a linear probe on the frozen pre-trained features of the same shots, "
        "zero-shot where the model has it), written to eval.json as anchor_<name>_<metric> (e.g. anchor_probe_accuracy)."))
    device: str = field(default="auto", metadata=_help(
        "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps; a device this machine lacks is an error."))

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {_short(value)}")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"train.lr must be a positive number, got {_short(self.lr)}")
        check_seed("train.seed", self.seed)
        if self.base_optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"train.base_optimizer must be adamw, adam or sgd, got {_short(self.base_optimizer)}")
        if any(not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= self.steps for s in self.val_eval_steps):
            raise ValueError(f"train.val_eval_steps must be steps in 1..train.steps={self.steps}, got {_short(self.val_eval_steps)}")
        bad = [s for s in self.eval_splits if s not in ("test", "train", "val")]
        if bad:
            raise ValueError(f"train.eval_splits entries must be test, train or val, got {bad}")


@dataclass
class ExperimentConfig:
    """One fine-tuning experiment: task, model, data, adapter, method, loop, output."""

    task: str = field(default="text_classification", metadata=_help(
        "Registered task name (flatpeft.experiments.tasks); multimodal: clip_fewshot, vlm_instruct, hf_vlm."))
    model: str = field(default="builtin:minilm", metadata=_help(
        "Hugging Face model name, local directory, or builtin:minilm / builtin:smollm2 (offline assets)."))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Data files, sampling and tokenisation."))
    peft: PeftSettings = field(default_factory=PeftSettings, metadata=_help("Adapter type and hyper-parameters."))
    method: dict[str, Any] = field(default_factory=lambda: {"name": "base"}, metadata=_help(
        "Optimisation method: name (a registered method: flatpeft methods) plus any create_optimizer keyword (rho, "
        "fraction, ...) except those train holds (lr, base_optimizer, total_steps, weight_decay)."))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_help("Training loop settings."))
    task_args: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "Task-specific options, validated by the task's own args dataclass."))
    output_dir: str = field(default="runs/example", metadata=_help("Run directory (compare: one sub-directory per method and seed)."))

    def __post_init__(self) -> None:
        if not isinstance(self.method, dict) or not isinstance(self.method.get("name"), str):
            raise ValueError(f"method must be a mapping with a string 'name', got {_short(self.method)}")
        _check_method_section(self.method)
        if not isinstance(self.task_args, dict):
            raise ValueError(f"task_args must be a mapping, got {_short(self.task_args)}")
        for name in ("task", "model", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {_short(value)}")


#: ``method`` keywords whose value the ``train`` section holds (the runner passes it to the optimizer): giving
#: them in ``method`` too would make two values for one setting, so they are refused there.
TRAIN_OWNED_METHOD_KEYS = {"lr": "train.lr", "base_optimizer": "train.base_optimizer", "total_steps": "train.steps",
                           "weight_decay": "train.weight_decay"}


def _check_method_section(method: dict[str, Any]) -> None:
    """Refuse ``method`` keywords that duplicate a ``train`` setting (naming both keys) and check ``method.seed``."""
    for key, home in TRAIN_OWNED_METHOD_KEYS.items():
        if key in method:
            raise ValueError(f"method.{key}: this setting belongs to {home} (the runner passes {home} to the "
                             f"optimizer); give it there only, so one value has one meaning")
    if "seed" in method:
        check_seed("method.seed", method["seed"])


# Sections whose contents are free-form mappings (validated elsewhere: create_optimizer / the task).
_FREE_SECTIONS = ("method", "task_args")


def field_help(cls: type) -> dict[str, str]:
    """Map each field name of dataclass ``cls`` to its help text."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _yaml_flow(value: Any) -> str:
    """``value`` as it would be written in a config file (flow style: ``null``, ``[query, value]``, ``{name: base}``)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def config_key_table() -> str:
    """The Markdown table of every config key, its default and its help text (docs/cli.md, "Config files"), built
    from the dataclasses' field help, so the documentation cannot drift from the code: top-level scalar keys
    first, then the keys of each section."""
    def cell(text: str) -> str:  # "<split>" would be read as an HTML tag
        return text.replace("<", "&lt;").replace("|", "\\|")

    rows = ["| key | default | meaning |", "|---|---|---|"]
    default = ExperimentConfig()
    sections = []
    for f in dataclasses.fields(ExperimentConfig):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            rows.append(f"| `{f.name}` | `{_yaml_flow(value)}` | {cell(f.metadata.get('help', ''))} |")
    for name, section in sections:
        for g in dataclasses.fields(section):
            rows.append(f"| `{name}.{g.name}` | `{_yaml_flow(getattr(section, g.name))}` | "
                        f"{cell(g.metadata.get('help', ''))} |")
    return "\n".join(rows)


def _type_name(tp: Any) -> str:
    """Words for a type annotation in an error message (``int`` -> "an integer", ``list[str]`` -> "a list of strings")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        inner = _type_name(args[0]) if args else "values"
        return "a list" + ("" if not args or args[0] is Any else " of " + _PLURAL.get(args[0], inner))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


_NAMES: dict[Any, str] = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                          type(None): "null", dict: "a mapping"}
_PLURAL: dict[Any, str] = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as read from YAML) fits annotation ``tp``; annotations it does not know are accepted."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list or tp is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def check_field_type(key: str, value: Any, tp: Any) -> None:
    """Raise ``ValueError`` naming ``key`` when ``value`` does not fit annotation ``tp`` (booleans are no integers).

    A scalar given where a list is expected (``--set train.eval_splits=test``) gets a hint to write a YAML list.
    """
    if _matches(value, tp):
        return
    msg = f"{key}: expected {_type_name(tp)}, got {_short(value)} ({type(value).__name__})"
    wants_list = typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in typing.get_args(tp))
    if wants_list and not isinstance(value, list):
        shown = value[:200] if isinstance(value, str) else _short(value)
        msg += f"; write a YAML list, e.g. --set '{key}=[{shown}]'"
    raise ValueError(msg)


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of dataclass ``cls`` (empty when they cannot be resolved: then only ``__post_init__`` checks)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation must not hide the dataclass's own checks
        return {}


def parse_dataclass(cls: type, raw: Any, where: str = ""):
    """Build dataclass ``cls`` from mapping ``raw``, rejecting unknown keys by name.

    Nested dataclass fields are parsed recursively; ``where`` is the dotted prefix used in messages
    (``"data."``). Tasks use this for their ``task_args``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}: {_short(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ValueError(
            f"unknown config key {where}{unknown[0]!s} (valid keys{' in ' + where.rstrip('.') if where else ''}: "
            f"{', '.join(fields)})")
    kwargs = {}
    hints = _field_types(cls)
    for key, value in raw.items():
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = parse_dataclass(sub, value, f"{where}{key}.")
        else:
            if key in hints:
                check_field_type(f"{where}{key}", value, hints[key])
            kwargs[key] = copy.deepcopy(value)
    try:
        return cls(**kwargs)
    except TypeError as err:  # e.g. a missing required field of a task args class
        raise ValueError(f"{where.rstrip('.') or cls.__name__}: {err}") from None


def config_from_dict(raw: Mapping[str, Any] | None) -> ExperimentConfig:
    """Validate a raw mapping (e.g. from YAML) into an :class:`ExperimentConfig`."""
    return parse_dataclass(ExperimentConfig, raw or {})


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict of ``cfg`` (inverse of :func:`config_from_dict`)."""
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ValueError(f"--set expects key.sub=value, got {_short(item)}")
    key, text = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ValueError(f"--set expects key.sub=value, got {_short(item)}")
    try:
        value = safe_load_yaml(text) if text.strip() else ""
    except _ConfigYAMLError as err:
        raise ValueError(f"--set {key}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--set {key}: value {_short(text)} is not valid YAML: {err}") from None
    return parts, value


def apply_overrides(raw: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.sub=value`` overrides applied (values parsed as YAML).

    Keys are validated later by :func:`config_from_dict`, so a misspelt override fails like a misspelt
    key in the file.
    """
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"--set {_short(item)}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_utf8(path: str | Path) -> str:
    """The text of ``path``; bytes that are not UTF-8 raise ``ValueError`` naming the file, line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}:{line}:{column}: byte {data[err.start:err.start + 1]!r} is not UTF-8 "
                         "(save the file as UTF-8)") from None


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """The raw top-level mapping of a YAML config file (``yaml.safe_load`` semantics), with clear errors.

    ``path`` may also name a built-in config (``finefoods_fewshot``; :func:`flatpeft.resources.resolve_config_path`).
    """
    from flatpeft.resources import missing_config_hint, resolve_config_path

    ref, path = path, resolve_config_path(path)
    if not path.is_file():
        raise ValueError(f"config file {_short(str(path))} does not exist{missing_config_hint(ref)}")
    try:
        raw = safe_load_yaml(read_utf8(path)) or {}
    except _ConfigYAMLError as err:
        raise ValueError(f"config file {_short(str(path))}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {_short(str(path))} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {_short(str(path))} must hold a mapping at top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config with ``yaml.safe_load``, apply ``--set`` overrides, validate."""
    raw = read_config_mapping(path)
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def missing_keys(raw: Mapping[str, Any], cls: type = ExperimentConfig, where: str = "") -> list[str]:
    """Dotted keys of ``cls`` (recursively through nested sections) that the mapping ``raw`` lacks.

    A run's recorded ``config.yaml`` holds every key; one that lacks some was cut or not written by flatpeft.
    """
    missing = []
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            missing.append(f"{where}{f.name}")
            continue
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(raw[f.name], Mapping):
            missing += missing_keys(raw[f.name], sub, f"{where}{f.name}.")
    return missing


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML, atomically (``load_config`` reads back an equal config)."""
    from .rundir import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, dump_yaml(config_to_dict(cfg)))  # never half a config, also after a kill


def _is_builtin(ref: str) -> bool:
    return ref.startswith(BUILTIN_PREFIX)


#: ``builtin:<name>`` models -> the :mod:`flatpeft.assets` function that returns their directory.
BUILTIN_MODELS = {"minilm": "minilm_path", "smollm2": "smollm2_path"}


def check_model_ref(ref: str) -> None:
    """Refuse (naming ``model``) a ``builtin:<name>`` that is no built-in model; loads nothing."""
    if _is_builtin(ref) and ref[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
        raise ValueError(f"model: unknown built-in model {_short(ref)} "
                         f"(valid: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)})")


def resolve_model_path(ref: str) -> str:
    """``builtin:minilm`` / ``builtin:smollm2`` -> local directory (flatpeft.assets); else ``ref`` unchanged."""
    if not _is_builtin(ref):
        return ref
    from flatpeft import assets  # lazy: assets pulls optional packages

    check_model_ref(ref)
    return str(getattr(assets, BUILTIN_MODELS[ref[len(BUILTIN_PREFIX):]])())


def resolve_data_path(ref: str, field_name: str = "data") -> Path:
    """A data reference -> an existing file.

    ``builtin:finefoods/train`` -> ``flatpeft.assets.finefoods_splits()["train"]``; anything else is a file
    path. Raises ``ValueError`` naming ``field_name`` and the value when the file does not exist.
    """
    if _is_builtin(ref):
        from flatpeft import assets

        spec = ref[len(BUILTIN_PREFIX):]
        dataset, _, split = spec.partition("/")
        splitters = {"finefoods": "finefoods_splits", "austen": "austen_splits"}
        if dataset not in splitters or not split:
            valid = ", ".join(f"{BUILTIN_PREFIX}{d}/{s}" for d in splitters for s in ("train", "test"))
            raise ValueError(f"{field_name}: unknown built-in data {_short(ref)} (valid: {valid})")
        splits = getattr(assets, splitters[dataset])()
        if split not in splits:
            raise ValueError(f"{field_name}: built-in dataset {_short(dataset)} has no split {_short(split)} "
                             f"(valid: {', '.join(sorted(splits))})")
        return Path(splits[split])
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ValueError(f"{field_name}: data file {_short(ref)} does not exist")
    return path


def resolve_test_ref(data: DataConfig) -> str | None:
    """The test set a config names: ``data.test``, else the ``test`` split of a built-in ``data.train``
    (``builtin:<dataset>/train`` -> ``builtin:<dataset>/test``), else ``None`` (no test set: never another
    dataset's)."""
    if data.test is not None:
        return data.test
    if _is_builtin(data.train) and data.train.endswith("/train"):
        return data.train[: -len("train")] + "test"
    return None


def absolutize_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Copy of ``cfg`` with relative data paths and local model directories made absolute.

    Built-in references and hub names stay as they are; an absolute path is unchanged, so this is
    idempotent (the resolved config round-trips).
    """
    out = copy.deepcopy(cfg)
    out.data.test = resolve_test_ref(out.data)
    for name in ("train", "test"):
        ref = getattr(out.data, name)
        if ref is not None and not _is_builtin(ref) and Path(ref).expanduser().exists():
            setattr(out.data, name, str(Path(ref).expanduser().resolve()))
    if not _is_builtin(out.model) and Path(out.model).expanduser().is_dir():
        out.model = str(Path(out.model).expanduser().resolve())
    return out
