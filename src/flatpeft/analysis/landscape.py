"""1-D and 2-D loss-landscape slices around the trained adapter, with filter-normalised random directions.

Li, Xu, Taylor, Studer & Goldstein (NeurIPS 2018), "Visualizing the Loss Landscape of Neural Nets": draw a
Gaussian direction ``d`` with the parameters' shapes and rescale it *filter-wise*,
``d_row <- d_row / ||d_row|| * ||theta_row||``, so that the slice is comparable across scale-invariant
reparametrisations.  Here the directions live only on the trainable (PEFT) tensors, and a "row" (filter) is a
slice along the first dimension of each tensor: a row of LoRA ``A`` (r x in) is one rank component, a row of
``B`` (out x r) one output unit, a row of a head weight one class.  A 1-D tensor (a bias) is treated as a
single filter (Li et al. zero bias directions instead, ``--xignore biasbn``; we keep them so every trainable
tensor is probed).  A row whose parameter row is 0 gets direction 0.

``L(theta + a d1 + b d2)`` is evaluated on a grid; parameters are restored bit-exactly afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .operators import HessianOperator, restore_parameters
from .results import ConcentrationCurve, LandscapeSlice

__all__ = [
    "symmetric_grid",
    "filter_normalize",
    "random_direction",
    "landscape_1d",
    "landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_concentration",
]


def symmetric_grid(radius: float, num: int) -> np.ndarray:
    """``num`` points evenly spaced on ``[-radius, radius]``; for odd ``num`` the middle point is exactly 0."""
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    half = (num - 1) / 2.0
    return radius * (np.arange(num) - half) / half


def filter_normalize(direction: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Rescale each row (slice along dim 0) of ``direction`` to the norm of the same row of ``param``.

    0-D / 1-D tensors are one filter.  Returns a new tensor; ``||out_row|| = ||param_row||`` exactly up to
    rounding (0 where the parameter row is 0).
    """
    if direction.shape != param.shape:
        raise ValueError(f"direction shape {tuple(direction.shape)} != param shape {tuple(param.shape)}")
    if param.ndim <= 1:
        d = direction.reshape(1, -1)
        p = param.detach().reshape(1, -1)
    else:
        d = direction.reshape(param.shape[0], -1)
        p = param.detach().reshape(param.shape[0], -1)
    dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    pn = torch.linalg.vector_norm(p.to(d.dtype), dim=1, keepdim=True)
    factor = torch.where(dn > 0, pn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
    return (d * factor).reshape(direction.shape)


def random_direction(
    params: Sequence[torch.Tensor], generator: torch.Generator, *, normalization: str = "filter"
) -> list[torch.Tensor]:
    """Gaussian direction over ``params`` (float64 draws from ``generator`` on CPU), filter-normalised or not."""
    if normalization not in ("filter", "none"):
        raise ValueError(f"normalization must be 'filter' or 'none', got {normalization!r}")
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if normalization == "filter":
            d = filter_normalize(d, p.detach().to("cpu", torch.float64))
        out.append(d.to(device=p.device, dtype=p.dtype))
    return out


def _evaluate_grid(
    operator: HessianOperator,
    directions: Sequence[Sequence[torch.Tensor]],
    coords: Sequence[Sequence[float]],
    progress: bool,
) -> list[float]:
    params = operator.params
    losses = []
    with restore_parameters(params) as saved:
        for c in tqdm(coords, desc="landscape", disable=not progress, leave=False):
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.copy_(saved[i])
                    for coef, d in zip(c, directions):
                        if coef != 0.0:
                            p.add_(d[i], alpha=float(coef))
            losses.append(operator.loss())
    return losses


def landscape_1d(
    operator: HessianOperator,
    *,
    radius: float = 1.0,
    num: int = 21,
    seed: int = 0,
    normalization: str = "filter",
    progress: bool = False,
) -> LandscapeSlice:
    """``L(theta + a d)`` for ``a`` in ``symmetric_grid(radius, num)``; ``d`` random (seeded), filter-normalised."""
    gen = torch.Generator().manual_seed(seed)
    d1 = random_direction(operator.params, gen, normalization=normalization)
    alphas = symmetric_grid(radius, num)
    center = operator.loss()
    losses = _evaluate_grid(operator, [d1], [(float(a),) for a in alphas], progress)
    return LandscapeSlice(
        alphas=tuple(float(a) for a in alphas),
        betas=None,
        losses=np.asarray(losses),
        center_loss=float(center),
        normalization=normalization,
        seed=seed,
    )


def landscape_2d(
    operator: HessianOperator,
    *,
    radius: float = 1.0,
    num: int = 11,
    seed: int = 0,
    normalization: str = "filter",
    progress: bool = False,
) -> LandscapeSlice:
    """``L(theta + a d1 + b d2)`` on a ``num x num`` grid; ``d1, d2`` independent seeded random directions."""
    gen = torch.Generator().manual_seed(seed)
    d1 = random_direction(operator.params, gen, normalization=normalization)
    d2 = random_direction(operator.params, gen, normalization=normalization)
    grid = symmetric_grid(radius, num)
    center = operator.loss()
    coords = [(float(a), float(b)) for a in grid for b in grid]
    losses = _evaluate_grid(operator, [d1, d2], coords, progress)
    return LandscapeSlice(
        alphas=tuple(float(a) for a in grid),
        betas=tuple(float(b) for b in grid),
        losses=np.asarray(losses).reshape(num, num),
        center_loss=float(center),
        normalization=normalization,
        seed=seed,
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_landscape_1d(result: LandscapeSlice, path: str | Path, *, title: str = "") -> Path:
    """Line plot of a 1-D slice (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(result.alphas, result.losses, marker="o", ms=3)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(f"step along random direction ({result.normalization}-normalised)")
    ax.set_ylabel("training loss")
    ax.set_title(title or "1-D loss slice around the trained adapter")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_landscape_2d(result: LandscapeSlice, path: str | Path, *, title: str = "", levels: int = 20) -> Path:
    """Filled contour plot of a 2-D slice (PNG); the trained point is marked at (0, 0)."""
    if result.betas is None:
        raise ValueError("plot_landscape_2d needs a 2-D slice (betas is None)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    a, b = np.meshgrid(result.alphas, result.betas, indexing="ij")
    cs = ax.contourf(a, b, result.losses, levels=levels, cmap="viridis")
    ax.contour(a, b, result.losses, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(cs, ax=ax, label="training loss")
    ax.plot([0], [0], marker="*", color="red", ms=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(title or f"2-D loss slice ({result.normalization}-normalised directions)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_concentration(
    curves: Mapping[str, ConcentrationCurve], path: str | Path, *, title: str = ""
) -> Path:
    """Concentration curves (share of sharpness vs percent of dimensions) with the uniform diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, curve in curves.items():
        xs = [p[0] for p in curve.points]
        ys = [p[1] for p in curve.points]
        ax.plot(xs, ys, label=f"{label} (n={curve.num_dimensions}, {curve.score})")
    ax.plot([0, 100], [0, 1], color="grey", ls="--", lw=0.8, label="uniform")
    ax.axvline(5.0, color="red", lw=0.5, ls=":")
    ax.set_xlabel("sharpest dimensions (%)")
    ax.set_ylabel("share of total sharpness")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Concentration of sharpness")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
