"""``text_classification``: few-shot sequence classification with any Hugging Face encoder or decoder.

Pipeline (the protocol of ``docs/algorithms.md``):

1. Read the train pool and the test file (CSV / JSONL / JSON / Parquet, via pandas; text files must be UTF-8,
   a broken JSONL line is named by file and line); check that ``data.text_column`` and ``data.label_column``
   exist (the error names the column, the file and the columns that do exist) and that no row has an empty
   text or label (named by file, row and column; ``data.drop_missing: true`` drops such rows and says how
   many). Classes are the sorted unique labels of the train pool. Without ``data.test`` (and no built-in
   ``data.train`` whose test split it would be) there is no test set: ``train.eval_splits`` must then name
   only train / val.
2. Carve a fixed validation split of ``data.val_size`` rows off the pool with ``data.val_seed``
   (independent of the run seed, so every run and method shares it).
3. Draw ``data.shots`` examples per class from the rest with the run seed (numpy ``default_rng``).
4. Tokenise once (truncation to ``data.max_length``); batches are padded dynamically.
5. Build ``AutoModelForSequenceClassification`` and apply peft: LoRA (``LoraConfig``), prefix tuning
   (``PrefixTuningConfig``), prompt tuning (``PromptTuningConfig``), all with ``task_type="SEQ_CLS"`` so the
   classification head is trained (peft's ``modules_to_save`` default for SEQ_CLS: ``classifier`` /
   ``score``), or full fine-tuning (``peft.type: none``).
6. Training batches: an endless stream of per-epoch permutations drawn from a ``torch.Generator`` seeded
   with the run seed (never the global RNG), cut into full batches.
7. Evaluation: eval mode, ``torch.inference_mode``, examples sorted by length, batches of
   ``train.eval_batch_size`` with dynamic padding; ``accuracy`` and ``macro_f1`` (scikit-learn).
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from flatpeft._checks import short_repr

from .sampling import carve_validation, epoch_batches, sample_shots
from .config import ExperimentConfig, parse_dataclass, resolve_data_path, resolve_model_path, resolve_test_ref
from .tasks import Metric
from .tasks import Task, check_module_names, register_task

__all__ = ["TextClassificationArgs", "TextClassificationTask", "read_table", "check_missing", "check_label_types",
           "read_examples", "check_positions", "flip_labels", "apply_shift", "is_drink_review", "DRINK_WORDS",
           "classification_metrics"]


@dataclass
class TextClassificationArgs:
    """``task_args`` of ``text_classification``."""

    model_dropout: float | None = field(default=None, metadata={"help": (
        "Override the model's hidden / attention dropout (BERT: hidden_dropout_prob, "
        "attention_probs_dropout_prob; 0 turns dropout off); null keeps the model's default.")})

    label_noise: float = field(default=0.0, metadata={"help": (
        "Symmetric label noise on the drawn training examples: exactly round(label_noise * n) of the n k-shot "
        "examples (chosen with the run seed) get a label drawn uniformly from the other classes; validation and "
        "test labels stay clean. 0 turns it off.")})
    shift: str | None = field(default=None, metadata={"help": (
        "Distribution shift between training and test: 'drinks' trains (and validates) on the reviews of the "
        "train pool that mention no drink (coffee, tea, ...) and tests on the drink reviews of both files; null "
        "keeps the files' own split.")})

    test_size: int | None = field(default=None, metadata={"help": (
        "Evaluate on a fixed subset of this many test examples (drawn once with a fixed seed, the same for every "
        "run and method); null uses the whole test set.")})

    def __post_init__(self) -> None:
        if self.test_size is not None and (isinstance(self.test_size, bool) or not isinstance(self.test_size, int)
                                           or self.test_size < 1):
            raise ValueError(f"task_args.test_size must be a positive integer or null, got {self.test_size!r}")
        if self.model_dropout is not None and not 0.0 <= float(self.model_dropout) < 1.0:
            raise ValueError(f"task_args.model_dropout must be in [0, 1) or null, got {self.model_dropout!r}")
        if not 0.0 <= float(self.label_noise) < 1.0:
            raise ValueError(f"task_args.label_noise must be in [0, 1), got {self.label_noise!r}")
        if self.shift is not None and self.shift not in SHIFTS:
            raise ValueError(f"task_args.shift must be one of {', '.join(SHIFTS)} or null, got {self.shift!r}")


#: Words that mark a review as being about a drink (whole words, case-insensitive): the ``drinks`` shift.
DRINK_WORDS = ("coffee", "coffees", "tea", "teas", "espresso", "k-cup", "k-cups", "kcup", "kcups", "drink", "drinks",
               "juice", "juices", "soda", "sodas", "latte", "cocoa", "brew", "brewed", "beverage", "beverages")
SHIFTS = ("drinks",)


def is_drink_review(texts: "pd.Series") -> np.ndarray:
    """Boolean mask: the review mentions one of :data:`DRINK_WORDS` as a whole word (case-insensitive)."""
    import re

    pattern = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, DRINK_WORDS)) + r")(?![\w-])", re.IGNORECASE)
    return texts.astype(str).map(lambda t: bool(pattern.search(t))).to_numpy(bool)


def apply_shift(pool: pd.DataFrame, test: pd.DataFrame, text_column: str, shift: str | None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (train pool, test set) of ``shift``: ``drinks`` = non-drink reviews of the pool, drink reviews of both."""
    if shift is None:
        return pool, test
    if shift != "drinks":
        raise ValueError(f"task_args.shift: unknown shift {shift!r}")
    in_pool, in_test = is_drink_review(pool[text_column]), is_drink_review(test[text_column])
    return (pool[~in_pool].reset_index(drop=True),
            pd.concat([pool[in_pool], test[in_test]], ignore_index=True))


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: exactly ``round(fraction * n)`` positions (drawn with ``seed``) get a label drawn
    uniformly from the *other* classes. Returns ``(noisy labels, flipped positions)``."""
    labels = np.asarray(labels, np.int64)
    n_flip = int(round(fraction * len(labels)))
    if n_flip == 0:
        return labels.copy(), np.array([], np.int64)
    rng = np.random.default_rng([seed, 0x4E015E])
    where = np.sort(rng.choice(len(labels), size=n_flip, replace=False))
    noisy = labels.copy()
    shift = rng.integers(1, num_classes, size=n_flip)  # 1..C-1: never the true class
    noisy[where] = (labels[where] + shift) % num_classes
    return noisy, where


def _read_jsonl(text: str, path: Path) -> pd.DataFrame:
    """Parse JSON Lines: one object per non-blank line; a broken line raises ``ValueError`` naming file and line."""
    import json

    rows, numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
        numbers.append(number)
    df = pd.DataFrame(rows)
    df.attrs["line_numbers"] = numbers  # so that errors about a row can name its line
    return df


def read_table(path: str | Path, columns: tuple[str, ...] = (), field_name: str = "data") -> pd.DataFrame:
    """Read a CSV / TSV / JSONL / JSON / Parquet file into a DataFrame and check that ``columns`` exist.

    Raises ``ValueError`` naming the field, the file and (for a missing column) the columns that exist; text
    formats must be UTF-8 (the error names file, line and column of the first bad byte), and a broken JSONL
    line is named by file and line.
    """
    import io

    from .config import read_utf8

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"):
        raise ValueError(f"{field_name}: unsupported file type {suffix!r} for {str(path)!r} "
                         "(use .csv, .tsv, .jsonl, .json or .parquet)")
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            text = read_utf8(path)
            if suffix in (".csv", ".tsv"):
                df = pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",")
            elif suffix in (".jsonl", ".ndjson") or not text.lstrip().startswith(("[", "{")):
                df = _read_jsonl(text, path)
            else:
                try:
                    df = pd.read_json(io.StringIO(text))
                except ValueError:
                    df = _read_jsonl(text, path)
    except ValueError as err:
        raise ValueError(f"{field_name}: {err}") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{field_name}: cannot read {str(path)!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises its own errors for a corrupt Parquet file
        raise ValueError(f"{field_name}: cannot read {str(path)!r}: {type(err).__name__}: {err}") from None
    for col in columns:
        if col not in df.columns:
            raise ValueError(f"{field_name}: column {col!r} not found in {str(path)!r} "
                             f"(columns: {', '.join(map(str, df.columns))})")
    return df


def check_missing(df: pd.DataFrame, columns: tuple[str, ...], path: Path, field_name: str,
                  drop: bool) -> pd.DataFrame:
    """Refuse (or, with ``drop``, drop and report) rows whose value in any of ``columns`` is missing or blank.

    The error names the file, the first such row (1-based, header not counted) and its column, and how many
    rows are affected. An integer label column that pandas read as float because of the gaps becomes integer
    again after dropping.
    """
    import sys

    bad = pd.Series(False, index=df.index)
    first: tuple[int, str] | None = None
    for col in columns:
        values = df[col]
        blank = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            first = min(first, (row, col)) if first else (row, col)
        bad |= blank
    if not bad.any():
        return df
    if not drop:
        row, col = first
        raise ValueError(f"{field_name}: {path}: row {row + 1} has an empty or missing value in column {col!r} "
                         f"({int(bad.sum())} such row(s) of {len(df)}); fix the file, or set data.drop_missing: "
                         "true to drop such rows")
    print(f"flatpeft: note: {field_name}: dropped {int(bad.sum())} of {len(df)} row(s) with an empty or missing "
          f"{' / '.join(columns)} in {path}", file=sys.stderr)
    df = df[~bad].reset_index(drop=True)
    for col in columns:
        if df[col].dtype.kind == "f" and np.all(np.mod(df[col].to_numpy(), 1) == 0):
            df[col] = df[col].astype(np.int64)
    return df


def _label_kind(value: Any) -> str | None:
    """What a label is, for :func:`check_label_types`: "a string", "a number", "a boolean", ... (None: missing)."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "a number"
    return f"a {type(value).__name__}"


def _where(df: pd.DataFrame, path: Path, row: int) -> str:
    """``file:line`` of row ``row`` (0-based) for JSON Lines, else ``file: row N`` (1-based, header not counted)."""
    lines = df.attrs.get("line_numbers")
    return f"{path}:{lines[row]}" if lines and row < len(lines) else f"{path}: row {row + 1}"


def check_label_types(df: pd.DataFrame, column: str, path: Path, field_name: str) -> None:
    """Refuse a label column that mixes kinds of values (JSON ``1`` and ``"1"`` would be two classes).

    The labels of one file must all be strings, or all numbers (or all booleans); the error names the file and
    the line (JSON Lines) or row of the first label of another kind, and the first label. Missing labels are
    :func:`check_missing`'s business.
    """
    values = df[column].tolist()
    kinds = [_label_kind(v) for v in values]
    present = [i for i, k in enumerate(kinds) if k is not None]
    if not present:
        return
    first = present[0]
    other = next((i for i in present if kinds[i] != kinds[first]), None)
    if other is None:
        return
    raise ValueError(f"{field_name}: {_where(df, path, other)}: label {short_repr(values[other])} in column "
                     f"{column!r} is {kinds[other]}, but {_where(df, path, first)} has label {short_repr(values[first])}, "
                     f"{kinds[first]}; the labels of a file must be all strings or all numbers (else 1 and \"1\" "
                     "would be two classes): write them alike")


def read_examples(path: Path, columns: tuple[str, str], field_name: str, drop: bool) -> pd.DataFrame:
    """:func:`read_table` + :func:`check_label_types` + :func:`check_missing` of a (text, label) file; a file
    left with no examples (a header only, or every row dropped) is refused, naming it, before anything trains."""
    df = read_table(path, columns, field_name)
    check_label_types(df, columns[1], path, field_name)
    df = check_missing(df, columns, path, field_name, drop)
    if df.empty:
        raise ValueError(f"{field_name}: {path} holds no examples (a header only{', or every row dropped' if drop else ''})")
    return df


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """``accuracy`` and ``macro_f1``: the unweighted mean over the classes ``0 .. num_classes-1`` of the per-class
    F1 ``2 TP / (2 TP + FP + FN)``, 0 for a class that is neither true nor predicted (what scikit-learn's
    ``f1_score(average="macro", labels=range(num_classes), zero_division=0)`` returns)."""
    y_true, y_pred = np.asarray(y_true).astype(np.int64).ravel(), np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"classification_metrics: {y_true.size} true labels but {y_pred.size} predictions")
    hit = y_true == y_pred
    tp = np.bincount(y_true[hit], minlength=num_classes)[:num_classes].astype(np.float64)
    true_count = np.bincount(y_true, minlength=num_classes)[:num_classes]
    pred_count = np.bincount(y_pred, minlength=num_classes)[:num_classes]
    denom = (true_count + pred_count).astype(np.float64)  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return {"accuracy": float(hit.mean()), "macro_f1": float(f1.mean())}


def check_positions(model_config: Any, cfg: ExperimentConfig) -> None:
    """Refuse (naming the keys, the values and the model's limit) inputs longer than the model's positions:
    ``data.max_length`` plus, for prompt / prefix tuning, ``peft.num_virtual_tokens`` (prepended to every input)
    must fit ``max_position_embeddings`` (RoBERTa-style models lose ``pad_token_id + 1`` of them)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    if "roberta" in str(getattr(model_config, "model_type", "")) and model_config.pad_token_id is not None:
        limit -= model_config.pad_token_id + 1  # their position ids start after the padding index
    length, virtual = cfg.data.max_length, cfg.peft.num_virtual_tokens if cfg.peft.type in ("prompt", "prefix") else 0
    if length + virtual <= limit:
        return
    if virtual:
        raise ValueError(f"data.max_length={length} + peft.num_virtual_tokens={virtual} = {length + virtual} tokens "
                         f"exceed the {limit} positions of model {cfg.model!r}: lower data.max_length or "
                         "peft.num_virtual_tokens")
    raise ValueError(f"data.max_length={length} exceeds the {limit} positions of model {cfg.model!r}: set "
                     f"data.max_length to at most {limit}")


def _peft_wrap(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.nn.Module:
    """Apply the adapter of ``cfg.peft`` with ``task_type="SEQ_CLS"`` (head trainable), or none (full FT)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    p = cfg.peft
    extra = {"modules_to_save": list(p.modules_to_save)} if p.modules_to_save is not None else {}
    check_module_names(model, p.modules_to_save or [], "peft.modules_to_save", cfg.model)
    if p.type == "none":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if p.type == "lora":
        pcfg = LoraConfig(task_type="SEQ_CLS", r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                          target_modules=p.target_modules, **extra)
    elif p.type == "prefix":
        pcfg = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=p.num_virtual_tokens, **extra)
    else:
        pcfg = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=p.num_virtual_tokens, **extra)
    try:
        wrapped = get_peft_model(model, pcfg)
    except ValueError as err:
        raise ValueError(f"peft: cannot apply {p.type} to {cfg.model!r}: {err}") from None
    if p.type == "prefix":
        _check_prefix_support(wrapped, cfg.model)
    return wrapped


def _check_prefix_support(wrapped: torch.nn.Module, model_name: str) -> None:
    """Fail at build time (not at the first forward) when the backbone takes no ``past_key_values``.

    peft's sequence-classification prefix tuning feeds the prefix as ``past_key_values`` and checks the
    forward signature for that name (peft 0.21 ``PeftModelForSequenceClassification._prefix_tuning_forward``).
    Encoders such as BERT never took it, and transformers 5 decoders take ``cache`` instead, so with
    transformers 5 / peft 0.21 the check fails for every model and peft would raise only inside ``forward``.
    Same test as peft's, so this starts working when peft does.
    """
    import inspect

    base = wrapped.base_model
    names = [base] + [base.get_submodule(n) for n in [getattr(wrapped, "transformer_backbone_name", None)] if n]
    if not any("past_key_values" in inspect.signature(m.forward).parameters for m in names):
        raise ValueError(f"peft.type=prefix: {model_name!r} ({type(base).__name__}) does not accept past_key_values, "
                         "which peft's prefix tuning for sequence classification needs (transformers 5 models take `cache` "
                         "instead); use peft.type=prompt or lora")


@register_task("text_classification")
class TextClassificationTask(Task):
    """Few-shot text classification: any HF model, CSV/JSONL/Parquet data, LoRA / prompt / full fine-tuning."""

    args_cls = TextClassificationArgs
    metrics = {"accuracy": Metric(), "macro_f1": Metric()}

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> None:
        """Also: the data files exist, and a test set is named whenever ``train.eval_splits`` asks for it."""
        super().check_config(cfg)
        resolve_data_path(cfg.data.train, "data.train")
        test = resolve_test_ref(cfg.data)
        if test is None and "test" in cfg.train.eval_splits:
            raise ValueError(f"data.test: not set, and data.train ({cfg.data.train!r}) is your own file, so there is "
                             "no test set (flatpeft never evaluates on another dataset's): set data.test, or set "
                             "train.eval_splits to [val] / [train, val] to evaluate only on those")
        if test is not None:
            resolve_data_path(test, "data.test")
        if parse_dataclass(cls.args_cls, cfg.task_args, "task_args.").shift is not None and test is None:
            raise ValueError("task_args.shift needs a test set (data.test)")
        if cfg.data.val_size == 0 and ("val" in cfg.train.eval_splits or cfg.train.val_eval_steps):
            what = "train.eval_splits contains val" if "val" in cfg.train.eval_splits else "train.val_eval_steps is set"
            raise ValueError(f"data.val_size is 0, so there is no validation split, but {what}: set data.val_size "
                             "to a positive number or drop the validation evaluation")

    @classmethod
    def data_paths(cls, cfg: ExperimentConfig) -> dict[str, Path]:
        """The train pool and, when there is one, the test file."""
        test_ref = resolve_test_ref(cfg.data)
        return {"train": resolve_data_path(cfg.data.train, "data.train"),
                **({"test": resolve_data_path(test_ref, "data.test")} if test_ref is not None else {})}

    def __init__(self, cfg: ExperimentConfig, seed: int) -> None:
        super().__init__(cfg, seed)
        self.check_config(cfg)
        d = cfg.data
        cols = (d.text_column, d.label_column)
        paths = self.data_paths(cfg)
        train_path, test_path = paths["train"], paths.get("test")
        if test_path is None:
            import sys

            print(f"flatpeft: note: no test set (data.test is not set): evaluating only on "
                  f"{', '.join(cfg.train.eval_splits)}", file=sys.stderr)
        #: the files the examples come from (their sha256 goes into eval.json)
        self.data_files: dict[str, Path] = paths
        pool = read_examples(train_path, cols, "data.train", d.drop_missing)
        test = read_examples(test_path, cols, "data.test", d.drop_missing) if test_path is not None else pool.iloc[:0]
        if self.args.shift is not None:
            pool, test = apply_shift(pool, test, d.text_column, self.args.shift)
            if test.empty or pool.empty:
                raise ValueError(f"task_args.shift={self.args.shift}: no {'test' if test.empty else 'training'} "
                                 f"examples are left in {test_path if test.empty else train_path}")
        if self.args.test_size is not None and self.args.test_size < len(test):
            keep = np.sort(np.random.default_rng(2024).choice(len(test), size=self.args.test_size, replace=False))
            test = test.iloc[keep].reset_index(drop=True)
        self.classes = sorted(pool[d.label_column].unique().tolist(), key=lambda v: (str(type(v)), v))
        if len(self.classes) < 2:
            raise ValueError(f"data.label_column={d.label_column!r}: {train_path} has fewer than 2 classes "
                             f"({self.classes})")
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({str(v) for v in test[d.label_column].unique() if v not in index})
        if unknown:
            raise ValueError(f"data.test: labels {unknown} in {test_path} do not occur in the train pool "
                             f"(classes: {self.classes})")
        pool_y = pool[d.label_column].map(index).to_numpy(np.int64)
        if d.val_size > 0:
            val_idx, rest = carve_validation(len(pool), d.val_size, d.val_seed)
        else:
            val_idx, rest = np.array([], np.int64), np.arange(len(pool))
        source = (f"the train pool {train_path}" + (f" after the validation split (data.val_size={d.val_size})"
                  if d.val_size else "") + (f" (task_args.shift={self.args.shift})" if self.args.shift else ""))
        #: labels of the pool the shots are drawn from (its majority class is the ``majority`` anchor)
        self.pool_labels = pool_y[rest]
        train_idx = sample_shots(pool_y, d.shots, self.seed, classes=range(len(self.classes)), pool=rest,
                                 names=self.classes, source=source)

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_path = resolve_model_path(cfg.model)
        hint = ("; run `flatpeft data prepare --force`" if cfg.model.startswith("builtin:") else
                " (a Hugging Face model name needs the model in the local cache when offline, or a local directory)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as err:  # noqa: BLE001 - hub, file and parse errors of every kind
            raise ValueError(f"model: cannot load the tokenizer of {cfg.model!r}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from None
        if self.tokenizer.pad_token is None:  # decoder-only models (Llama, SmolLM2): pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs: dict[str, Any] = {"num_labels": len(self.classes),
                                  "id2label": {i: str(c) for i, c in enumerate(self.classes)},
                                  "label2id": {str(c): i for i, c in enumerate(self.classes)}}
        if self.args.model_dropout is not None:
            kwargs.update(hidden_dropout_prob=self.args.model_dropout,
                          attention_probs_dropout_prob=self.args.model_dropout)
        try:
            base = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
        except Exception as err:  # noqa: BLE001 - OSError, ValueError, safetensors' SafetensorError, ...
            raise ValueError(f"model: cannot load {cfg.model!r} ({model_path}) as a sequence classifier: "
                             f"{type(err).__name__}: {err}{hint}") from None
        if base.config.pad_token_id is None:
            base.config.pad_token_id = self.tokenizer.pad_token_id
        check_positions(base.config, cfg)
        self.model = _peft_wrap(base, cfg).to(self.device)
        self.model.train()  # from_pretrained returns eval mode; training runs with the model's dropout

        texts = pool[d.text_column].astype(str).tolist()
        train_y = pool_y[train_idx]
        #: the k-shot labels before noise, and the positions whose label was flipped (``task_args.label_noise``)
        self.clean_train_labels = train_y.copy()
        train_y, self.flipped = flip_labels(train_y, float(self.args.label_noise), len(self.classes), self.seed)
        self.splits: dict[str, dict[str, Any]] = {
            "train": self._encode([texts[i] for i in train_idx], train_y),
            "val": self._encode([texts[i] for i in val_idx], pool_y[val_idx]),
        }
        if test_path is not None:
            self.splits["test"] = self._encode(test[d.text_column].astype(str).tolist(),
                                               test[d.label_column].map(index).to_numpy(np.int64))

    # ---- data -----------------------------------------------------------------------------------
    def _encode(self, texts: list[str], labels: np.ndarray) -> dict[str, Any]:
        """Tokenise once without padding (truncated to ``data.max_length``)."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.data.max_length) if texts else {"input_ids": []}
        return {"input_ids": enc["input_ids"], "labels": np.asarray(labels, np.int64)}

    def _collate(self, split: str, idx: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Pad the chosen examples to the longest one in the batch (dynamic padding) and move them to the device."""
        data = self.splits[split]
        feats = [{"input_ids": data["input_ids"][i]} for i in idx]
        batch = self.tokenizer.pad(feats, padding=True, return_tensors="pt")
        batch["labels"] = torch.as_tensor(data["labels"][np.asarray(idx, np.int64)])
        return {k: v.to(self.device) for k, v in batch.items()}

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split``."""
        return len(self.splits[split]["labels"])

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless full batches from per-epoch permutations of a generator seeded with the run seed."""
        for idx in epoch_batches(self.num_examples("train"), self.cfg.train.batch_size, self.seed):
            yield self._collate("train", idx.tolist())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the classifier (the model computes it from ``labels``)."""
        return model(**batch).loss

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, split: str) -> np.ndarray:
        """Predicted class ids for ``split`` (eval mode, length-sorted batches, dynamic padding)."""
        data = self.splits[split]
        order = np.argsort([len(x) for x in data["input_ids"]], kind="stable")
        preds = np.empty(len(order), np.int64)
        bs = self.cfg.train.eval_batch_size
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                batch = self._collate(split, idx)
                batch.pop("labels")
                preds[idx] = model(**batch).logits.argmax(-1).cpu().numpy()
        finally:
            model.train(was_training)
        return preds

    @torch.inference_mode()
    def features(self, split: str) -> torch.Tensor:
        """Frozen pre-trained features of ``split``: the last hidden state of the backbone, mean over the
        non-padding tokens, with the adapters disabled (the model as pre-trained; a full fine-tuning run's model
        has no adapter to disable, so call this before training)."""
        model = self.model
        disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        data = self.splits[split]
        bs = self.cfg.train.eval_batch_size
        out = []
        was_training = model.training
        model.eval()
        try:
            with disable:
                for start in range(0, len(data["labels"]), bs):
                    batch = self._collate(split, list(range(start, min(start + bs, len(data["labels"])))))
                    batch.pop("labels")
                    hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def anchors(self, split: str = "test") -> dict[str, dict[str, float]]:
        """``majority`` (the constant classifier predicting the most frequent label of the labelled pool the
        shots are drawn from: the class prior a reader compares accuracy with) and ``probe``
        (:func:`~flatpeft.experiments.anchors.linear_probe` on :meth:`features` of the shots, with their labels as
        trained, noise included) on ``split``, with ``accuracy`` and ``macro_f1``."""
        from .anchors import linear_probe, majority_class

        y, train_y, n = self.splits[split]["labels"], self.splits["train"]["labels"], len(self.classes)
        majority = np.full(len(y), majority_class(self.pool_labels, n))
        probe = linear_probe(self.features("train"), train_y, self.features(split), n)
        return {"majority": classification_metrics(y, majority, n), "probe": classification_metrics(y, probe, n)}

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]:
        """``accuracy`` and ``macro_f1`` on ``split`` (``test``, ``train`` = the k-shot set, ``val``)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {split!r}")
        if self.num_examples(split) == 0:
            raise ValueError(f"split {split!r} is empty (data.val_size=0?)")
        y = self.splits[split]["labels"]
        return classification_metrics(y, self.predict(model, split), len(self.classes))
