"""The ``austen`` built-in dataset: which Jane Austen novel a passage comes from (6 classes), built from the
``janeausten`` asset (``{novel: [line, ...]}``) by :func:`build_austen_splits`; ``flatpeft data prepare`` writes
it to ``<cache>/austen/{train,test}.csv`` (see :func:`flatpeft.assets.austen_splits`).

Recipe (deterministic, no randomness):

1. **Body.** Per novel, the lines after the first chapter heading (``CHAPTER I``, ``Chapter 1``) up to the first
   end marker after it (``THE END``, ``FINIS``, or Northanger Abbey's editorial ``A NOTE ON THE TEXT``):
   title pages, prefaces and notes are left out. Chapter and volume headings and blank lines are dropped and
   runs of whitespace collapsed, so no passage carries a novel's heading style.
2. **Split by position.** The first ``train_fraction`` (80 %) of a novel's body words feed the train passages,
   the rest the test passages; the first test passage is dropped as a gap, so a train and a test passage never
   overlap nor neighbour (at least ``min_words`` words of text lie between them).
3. **Passages.** Consecutive body lines joined with spaces until the passage has at least ``min_words`` words
   (about 48-60 words: a line is about 12), and an incomplete last passage of a part is dropped.
4. **Balance.** The test set keeps ``test_per_novel`` passages per novel, evenly spaced over that novel's test
   part; the train pool keeps as many per novel as the shortest novel has (evenly spaced too), so both splits
   are balanced and accuracy can be read against chance (1 / 6).

Columns: ``text``, ``label`` (the novel's title, e.g. ``"Pride and Prejudice"``), ``novel`` (the key of the
asset, e.g. ``"prideprejudice"``), ``start_line`` / ``end_line`` (the passage's lines in the asset's list for
that novel, 0-based, end exclusive).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["AUSTEN_TITLES", "build_austen_splits", "novel_body", "passages"]

#: Asset key -> the title used as the readable class label.
AUSTEN_TITLES: dict[str, str] = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}

_HEADING = re.compile(r"^\s*(chapter|volume)\b", re.IGNORECASE)
_END_MARKERS = ("THE END", "FINIS", "A NOTE ON THE TEXT")


def novel_body(lines: Sequence[str]) -> list[tuple[int, str]]:
    """``(line index, text)`` of a novel's body: after the first chapter heading, before the first end marker,
    without headings and blank lines, whitespace collapsed. A novel without a chapter heading keeps every line."""
    start = next((i + 1 for i, line in enumerate(lines) if _HEADING.match(line) and
                  line.strip().split()[0].lower() == "chapter"), 0)
    body = []
    for i in range(start, len(lines)):
        text = " ".join(str(lines[i]).split())
        if text.upper() in _END_MARKERS:
            break
        if text and not _HEADING.match(text):
            body.append((i, text))
    return body


def passages(body: Sequence[tuple[int, str]], min_words: int) -> list[tuple[int, int, str]]:
    """Cut consecutive body lines into passages of at least ``min_words`` words: ``(start_line, end_line, text)``
    (end exclusive); the incomplete remainder is dropped."""
    out, parts, words, first = [], [], 0, None
    for index, text in body:
        first = index if first is None else first
        parts.append(text)
        words += len(text.split())
        if words >= min_words:
            out.append((first, index + 1, " ".join(parts)))
            parts, words, first = [], 0, None
    return out


def _evenly(items: list, k: int) -> list:
    """``k`` of ``items`` at evenly spaced positions (first and last included), in order."""
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)] if k > 1 else items[:k]


def _frame(rows: list[tuple[str, int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame({"text": [r[3] for r in rows], "label": [AUSTEN_TITLES.get(r[0], r[0]) for r in rows],
                         "novel": [r[0] for r in rows], "start_line": [r[1] for r in rows],
                         "end_line": [r[2] for r in rows]})


def build_austen_splits(novels: Mapping[str, Sequence[str]], *, min_words: int = 48, train_fraction: float = 0.8,
                        test_per_novel: int = 100) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``(train pool, test set)`` DataFrames of the recipe in this module's docstring, novels in sorted order.

    Raises ``ValueError`` naming the novel when its test part has fewer than ``test_per_novel`` passages, or a
    part has none, and for out-of-range settings.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    if min_words < 1 or test_per_novel < 1:
        raise ValueError(f"min_words and test_per_novel must be >= 1, got {min_words!r}, {test_per_novel!r}")
    if len(novels) < 2:
        raise ValueError(f"need at least 2 novels, got {sorted(novels)}")
    train_parts, test_parts = {}, {}
    for name in sorted(novels):
        body = novel_body(novels[name])
        cum = np.cumsum([len(text.split()) for _, text in body])
        cut = int(np.searchsorted(cum, train_fraction * cum[-1], side="right")) if len(body) else 0
        train_parts[name] = passages(body[:cut], min_words)
        test_parts[name] = passages(body[cut:], min_words)[1:]  # the first one is the gap
        if len(test_parts[name]) < test_per_novel or not train_parts[name]:
            raise ValueError(f"novel {name!r}: {len(train_parts[name])} train / {len(test_parts[name])} test "
                             f"passages of >= {min_words} words, {test_per_novel} test passages needed")
    per_novel = min(len(p) for p in train_parts.values())
    train = [(n, *p) for n in sorted(novels) for p in _evenly(train_parts[n], per_novel)]
    test = [(n, *p) for n in sorted(novels) for p in _evenly(test_parts[n], test_per_novel)]
    return _frame(train), _frame(test)
