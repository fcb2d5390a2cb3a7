"""Anchors: the reference predictors every task's fine-tuning must beat to count as learning.

A task's :meth:`~flatpeft.experiments.tasks.Task.anchors` evaluates them on one split with the run's own data
(its k-shot sample and seed), with the same metric names as its ``evaluate``:

* ``majority``: the constant classifier that predicts the most frequent class of the (possibly noisy) training
  shots (ties to the lowest class id). On an imbalanced test set its accuracy can be high while its macro-F1 is
  low, which is why imbalanced tasks report macro-F1 first.
* ``probe``: multinomial logistic regression on the frozen pre-trained features of the same shots
  (:func:`linear_probe`): what the features give without touching the backbone.
* ``zero_shot``: the pre-trained model's own predictions where it has them (a dual encoder's prompts).

A task whose fine-tuned ``base`` does not beat its probe anchor measures the shots more than the fine-tuning;
the results page flags it.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["majority_class", "linear_probe", "ANCHOR_NAMES"]

#: The anchors a task may report, in the order the page shows them.
ANCHOR_NAMES = ("majority", "probe", "zero_shot")


def majority_class(train_labels: np.ndarray, num_classes: int) -> int:
    """The most frequent label of ``train_labels`` (ties to the lowest class id)."""
    counts = np.bincount(np.asarray(train_labels, np.int64).ravel(), minlength=num_classes)
    return int(np.argmax(counts))


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray | torch.Tensor, test_x: torch.Tensor,
                 num_classes: int, l2: float = 1e-2, max_iter: int = 200) -> np.ndarray:
    """Predicted class ids of ``test_x`` from a multinomial logistic regression fitted on ``(train_x, train_y)``.

    Features are standardised with the training mean and standard deviation; the objective is the mean
    cross-entropy plus ``l2 / 2 * ||W||^2`` (bias not penalised), minimised in float64 by L-BFGS with strong Wolfe
    line search from zero (a strictly convex problem: the solution is unique, so the probe is deterministic).
    This is scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` on the standardised features.
    """
    x = train_x.detach().to("cpu", torch.float64)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long).cpu()
    t = test_x.detach().to("cpu", torch.float64)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    x, t = (x - mean) / std, (t - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (t @ w + b).argmax(-1).numpy()
