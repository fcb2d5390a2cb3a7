"""Curvature operators restricted to the trainable (PEFT) parameters.

An *operator* answers oracle questions about the loss ``L(theta)`` at the current trainable parameters
``theta`` (the tensors with ``requires_grad=True``: LoRA ``A``/``B``, heads, prompts; frozen backbone weights
are constants): its value, its gradient, Hessian-vector products ``H v`` and the loss at a shifted point
``theta + delta``.  Algorithms (``eigen``, ``trace``, ``sharpness``, ``landscape``) only talk to operators,
so they can be tested on a :class:`MatrixOperator` with a known ``H``.

Definitions used throughout:

* ``L(theta) = (1/B) sum_b loss_fn(model, batch_b)``: the unweighted mean of the per-batch losses over the
  list of batches given at construction (for equal-size batches of a mean-reduced loss this is the mean loss
  over all their examples).
* ``H = d^2 L / d theta^2`` over the trainable tensors only, flattened in ``named_parameters()`` order.
* ``H v`` by double backward (Pearlmutter): ``H v = d/dtheta (g(theta) . v)`` with
  ``g = torch.autograd.grad(L_b, theta, create_graph=True)``, averaged over batches.  One matvec costs one
  forward and two backward passes per batch; ``.grad`` fields are never touched.
* The model is put in ``eval()`` mode while the operator evaluates (dropout off, otherwise repeated HVPs are
  not the same linear map), and its previous mode is restored afterwards.
* Double backward through fused attention kernels is not implemented (on CPU torch raises
  "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so for
  Hugging Face models call :func:`use_eager_attention` first (or load with ``attn_implementation="eager"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

__all__ = [
    "LossFn",
    "trainable_parameters",
    "use_eager_attention",
    "eval_mode",
    "restore_parameters",
    "HessianOperator",
    "MatrixOperator",
    "as_linear_operator",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def trainable_parameters(
    model: nn.Module, param_filter: Callable[[str, nn.Parameter], bool] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Return ``(name, parameter)`` for every parameter with ``requires_grad`` (and ``param_filter`` True).

    For a peft model these are the adapter tensors (plus any ``modules_to_save`` such as a classifier head).
    Raises ``ValueError`` if nothing is selected.
    """
    selected = [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and (param_filter is None or param_filter(name, p))
    ]
    if not selected:
        raise ValueError(
            "model has no trainable parameters (requires_grad=True) matching param_filter; "
            "the Hessian operator needs at least one"
        )
    return selected


def use_eager_attention(model: nn.Module) -> bool:
    """Switch a Hugging Face model (or a peft wrapper of one) to eager attention; return True if it applied.

    SDPA/flash attention kernels have no double backward, which Hessian-vector products need.  Uses
    ``model.set_attn_implementation("eager")`` when transformers provides it, else sets
    ``config._attn_implementation = "eager"`` on every sub-module config.  Non-HF models are left alone.
    """
    applied = False
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter("eager")
            applied = True
        except (ValueError, AttributeError, TypeError):
            applied = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            try:
                config._attn_implementation = "eager"
                applied = True
            except (AttributeError, ValueError):
                pass
    return applied


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` (all sub-modules) in eval mode and restore every module's previous mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def restore_parameters(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Snapshot ``params`` and copy the snapshot back on exit, also on exceptions (bit-exact restore).

    Yields the list of saved copies (read-only use: the original values).
    """
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class HessianOperator:
    """Hessian of the batch-averaged loss w.r.t. the trainable parameters of ``model``.

    Args:
        model: the (peft) model; its trainable tensors are the operator's coordinates.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` (e.g. ``Task.loss``).
        batches: list of batches; ``L`` is the unweighted mean of the batch losses.
        param_filter: optional ``(name, param) -> bool`` to restrict to a subset of the trainable tensors.
        eval_mode: run the model in eval mode (dropout off).  Default True.

    Example:
        >>> op = HessianOperator(model, task.loss, task.analysis_batches(4))
        >>> hv = op.matvec(np.ones(op.dim))          # float64 in, float64 out
        >>> scipy.sparse.linalg.eigsh(op.as_linear_operator(), k=1, which="LA")
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        param_filter: Callable[[str, nn.Parameter], bool] | None = None,
        eval_mode: bool = True,
    ) -> None:
        batches = list(batches)
        if not batches:
            raise ValueError("batches must contain at least one batch, got an empty list")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        named = trainable_parameters(model, param_filter)
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.params: list[nn.Parameter] = [p for _, p in named]
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in self.params)
        self.numels: tuple[int, ...] = tuple(p.numel() for p in self.params)
        self.dim: int = int(sum(self.numels))
        self.use_eval_mode = eval_mode
        self.num_matvecs = 0

    # ------------------------------------------------------------------ flat <-> per-tensor views
    def split(self, flat: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector of length ``dim`` into tensors shaped like the parameters (their dtype/device)."""
        if isinstance(flat, np.ndarray):
            flat = torch.from_numpy(np.ascontiguousarray(flat))
        if flat.ndim != 1 or flat.numel() != self.dim:
            raise ValueError(f"vector must be 1-D of length {self.dim}, got shape {tuple(flat.shape)}")
        out = []
        for chunk, p in zip(torch.split(flat, list(self.numels)), self.params):
            out.append(chunk.reshape(p.shape).to(device=p.device, dtype=p.dtype))
        return out

    def flatten(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Concatenate per-tensor values into one float64 numpy vector."""
        return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()

    def parameters_flat(self) -> np.ndarray:
        """Current trainable parameters as a float64 vector."""
        return self.flatten(self.params)

    # ------------------------------------------------------------------ oracles
    def _context(self) -> contextlib.AbstractContextManager:
        return eval_mode(self.model) if self.use_eval_mode else contextlib.nullcontext()

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) for p in self.params]

    def loss(self) -> float:
        """``L(theta)``: mean loss over the batches (no graph kept)."""
        with self._context(), torch.no_grad():
            total = sum(float(self.loss_fn(self.model, b).detach()) for b in self.batches)
        return total / len(self.batches)

    def loss_at(self, delta: Sequence[torch.Tensor] | np.ndarray) -> float:
        """``L(theta + delta)``; parameters are restored bit-exactly afterwards (also on exceptions)."""
        deltas = self.split(delta) if isinstance(delta, (np.ndarray,)) or torch.is_tensor(delta) else delta
        with restore_parameters(self.params), torch.no_grad():
            for p, d in zip(self.params, deltas):
                p.add_(d.to(dtype=p.dtype, device=p.device))
            return self.loss()

    def gradient(self) -> tuple[float, list[torch.Tensor]]:
        """Return ``(L(theta), g)`` with ``g`` the per-tensor batch-averaged gradient (unused tensors: zeros)."""
        grads = self._zeros()
        total = 0.0
        with self._context(), torch.enable_grad():
            for batch in self.batches:
                loss = self.loss_fn(self.model, batch)
                gs = torch.autograd.grad(loss, self.params, allow_unused=True)
                for acc, g in zip(grads, gs):
                    if g is not None:
                        acc.add_(g.detach())
                total += float(loss.detach())
        n = len(self.batches)
        return total / n, [g / n for g in grads]

    def gradient_at(self, delta: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """``(L(theta + delta), grad L(theta + delta))``; parameters restored bit-exactly afterwards."""
        with restore_parameters(self.params):
            with torch.no_grad():
                for p, d in zip(self.params, delta):
                    p.add_(d.to(dtype=p.dtype, device=p.device))
            return self.gradient()

    def hvp(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``H v`` per tensor by double backward, averaged over the batches."""
        if len(vector) != len(self.params):
            raise ValueError(f"vector must have {len(self.params)} tensors, got {len(vector)}")
        out = self._zeros()
        with self._context(), torch.enable_grad():
            for batch in self.batches:
                loss = self.loss_fn(self.model, batch)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                dot = None
                for g, v in zip(grads, vector):
                    if g is not None and g.requires_grad:
                        term = (g * v).sum()
                        dot = term if dot is None else dot + term
                if dot is None:  # loss is at most linear in theta: H = 0
                    continue
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                for acc, h in zip(out, hv):
                    if h is not None:
                        acc.add_(h.detach())
        self.num_matvecs += 1
        n = len(self.batches)
        return [h / n for h in out]

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """Float64 numpy ``H v`` (the input is cast to the parameters' dtype for the product)."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        return self.flatten(self.hvp(self.split(v)))

    def as_linear_operator(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` of shape ``(dim, dim)``, float64, symmetric."""
        return as_linear_operator(self)


class MatrixOperator:
    """An explicit symmetric matrix behind the operator interface (``dim``, ``matvec``), for tests.

    Lets the eigen/trace algorithms be checked against closed forms without a model.
    """

    def __init__(self, matrix: np.ndarray) -> None:
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {matrix.shape}")
        if not np.allclose(matrix, matrix.T):
            raise ValueError("matrix must be symmetric")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.num_matvecs = 0

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """``H v`` in float64."""
        self.num_matvecs += 1
        return self.matrix @ np.asarray(v, dtype=np.float64).reshape(-1)

    def as_linear_operator(self) -> LinearOperator:
        """A scipy ``LinearOperator`` view."""
        return as_linear_operator(self)


def as_linear_operator(op: Any) -> LinearOperator:
    """Wrap any object with ``dim`` and ``matvec(np.ndarray) -> np.ndarray`` as a float64 LinearOperator.

    ``matmat`` falls back to column-wise matvecs (scipy's default), so each column costs one HVP.
    """

    def _mv(v: np.ndarray) -> np.ndarray:
        return op.matvec(np.asarray(v, dtype=np.float64).reshape(-1))

    return LinearOperator((op.dim, op.dim), matvec=_mv, rmatvec=_mv, dtype=np.float64)
