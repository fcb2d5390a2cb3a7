"""One sampling module for every task: the validation carve-out, k-shot draws, evaluation subsets and the endless
epoch batches. Every draw comes from its own seeded generator (numpy ``default_rng`` or a ``torch.Generator``),
never the global random state, so a run's examples and batch order depend on its seed alone."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["carve_validation", "sample_shots", "eval_subset", "epoch_batches"]


def carve_validation(n: int, val_size: int, val_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (validation, rest) with a fixed seed: the first ``val_size`` of a permutation."""
    if val_size >= n:
        raise ValueError(f"data.val_size={val_size} leaves no training examples (train pool has {n} rows)")
    perm = np.random.default_rng(val_seed).permutation(n)
    return np.sort(perm[:val_size]), np.sort(perm[val_size:])


def sample_shots(labels: np.ndarray, k: int | None, seed: int, *, classes: Sequence[int],
                 pool: np.ndarray | None = None, names: Sequence[Any] | None = None,
                 source: str = "the train pool", key: str = "data.shots") -> np.ndarray:
    """``k`` indices per class, drawn without replacement with ``numpy.random.default_rng(seed)``.

    Candidates are the indices of ``pool`` (default: every index of ``labels``) whose label is the class; classes
    are visited in the order given and the result is their draws concatenated. ``k=None`` returns the whole pool.
    A class with fewer than ``k`` candidates raises ``ValueError`` naming the setting ``key``, the class label
    (``names[c]``, default the class itself) and ``source``.
    """
    pool = np.arange(len(labels)) if pool is None else pool
    if k is None:
        return pool.copy()
    if k < 1:
        raise ValueError(f"{key} must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        cand = pool[labels[pool] == c]
        if len(cand) < k:
            label = names[c] if names is not None else c
            raise ValueError(f"{key}={k}: class {label!r} has only {len(cand)} example(s) in {source}, {k} needed; "
                             f"lower {key}" + (" (or data.val_size)" if key == "data.shots" else ""))
        chosen.append(rng.choice(cand, size=k, replace=False))
    return np.concatenate(chosen)


def eval_subset(labels: np.ndarray, classes: Sequence[int], per_class: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced evaluation subset: ``per_class`` examples per class (fixed ``seed``, the
    same for every run), or every example of ``classes`` when ``per_class`` is None (sorted either way)."""
    if per_class is None:
        return np.flatnonzero(np.isin(labels, np.asarray(classes)))
    return np.sort(sample_shots(labels, per_class, seed, classes=classes, key="eval_per_class"))


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches: per-epoch permutations of ``range(n)`` from a ``torch.Generator(seed)``,
    concatenated and cut into batches of ``min(batch_size, n)`` (the global RNG is never touched)."""
    gen = torch.Generator().manual_seed(int(seed))
    size = min(batch_size, n)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        out, buf = buf[:size], buf[size:]
        yield out
