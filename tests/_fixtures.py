"""Tiny offline text-classification setting for tests and smoke runs (no downloads, seconds on a CPU).

:func:`make_tiny_bert` saves a randomly initialised 2-layer BERT (built from a ``BertConfig``) and a
``BertTokenizerFast`` over a small word vocabulary to a directory; :func:`make_sentiment_files` writes a
synthetic two-class CSV (label 1 when the review's sentiment word is positive) that such a model can learn.
:func:`tiny_config` returns an :class:`ExperimentConfig` pointing at both. These are test fixtures: they
exercise the real pipeline end to end, but numbers measured on them say nothing about any method.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from flatpeft.experiments.config import ExperimentConfig, config_from_dict

__all__ = ["POSITIVE", "NEGATIVE", "FILLER", "make_tiny_bert", "make_sentiment_files", "tiny_config"]

POSITIVE = ["great", "good", "tasty", "lovely", "excellent", "fresh"]
NEGATIVE = ["bad", "awful", "stale", "bland", "terrible", "soggy"]
FILLER = ["the", "a", "coffee", "tea", "cookie", "snack", "was", "is", "this", "very", "box", "taste"]


def make_tiny_bert(directory: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
                   init_range: float = 0.02) -> Path:
    """Save a tiny random ``BertModel`` + ``BertTokenizerFast`` (vocab: special tokens + the fixture words)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    # transformers 5 builds the fast tokenizer from a {token: id} mapping (vocab_file= is ignored there).
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(directory))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=64,
                     initializer_range=init_range)
    BertModel(cfg).save_pretrained(str(directory))
    return directory


def make_sentiment_files(directory: str | Path, *, n_train: int = 120, n_test: int = 60, seed: int = 0,
                         suffix: str = ".csv", text_column: str = "text", label_column: str = "label") -> dict[str, Path]:
    """Write ``train`` / ``test`` files of synthetic reviews; label ``great`` iff the sentiment word is positive."""
    import pandas as pd

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            y = i % 2
            word = rng.choice(POSITIVE if y else NEGATIVE)
            words = list(rng.choice(FILLER, size=int(rng.integers(3, 9)))) + [word]
            rng.shuffle(words)
            rows.append({text_column: " ".join(words), label_column: "great" if y else "other"})
        df = pd.DataFrame(rows)
        path = directory / f"{split}{suffix}"
        if suffix == ".csv":
            df.to_csv(path, index=False)
        elif suffix == ".jsonl":
            df.to_json(path, orient="records", lines=True)
        elif suffix == ".parquet":
            df.to_parquet(path)
        else:
            raise ValueError(f"suffix must be .csv, .jsonl or .parquet, got {suffix!r}")
        out[split] = path
    return out


def tiny_config(directory: str | Path, **sections) -> ExperimentConfig:
    """Build the tiny model and data under ``directory`` and return a config using them.

    Keyword arguments replace whole top-level sections / update nested ones, e.g.
    ``tiny_config(tmp, method={"name": "sam", "rho": 0.05}, train={"steps": 5})``.
    """
    directory = Path(directory)
    model = make_tiny_bert(directory / "model")
    files = make_sentiment_files(directory / "data")
    raw = {
        "task": "text_classification",
        "model": str(model),
        "data": {"train": str(files["train"]), "test": str(files["test"]), "shots": 8, "val_size": 20,
                 "max_length": 16},
        "peft": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "method": {"name": "base"},
        "train": {"steps": 6, "lr": 5e-3, "batch_size": 8, "seed": 0, "log_every": 2, "eval_batch_size": 32},
        "task_args": {},
        "output_dir": str(directory / "runs"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key not in ("method", "task_args"):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config_from_dict(raw)
