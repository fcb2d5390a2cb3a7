"""Top Hessian eigenpairs with scipy's ARPACK Lanczos (``scipy.sparse.linalg.eigsh``).

No hand-written Lanczos: ``eigsh`` (implicitly restarted Lanczos, ARPACK) runs over the operator's
float64 ``LinearOperator`` view, so each Lanczos step costs one Hessian-vector product.

``which="LA"`` (largest algebraic) is the default: it returns the top of the spectrum, i.e. the most
positive curvature directions that sharpness refers to.  ``which="LM"`` (largest magnitude) would also return
large negative eigenvalues (saddle directions), which are not "sharpness" in the SAM sense.

When Hessian-vector products are expensive (MiniLM on a CPU: tens of seconds each) and only a rough top
eigenvalue is needed on a fixed budget, :func:`top_eigenpairs_lobpcg` runs scipy's LOBPCG
(``scipy.sparse.linalg.lobpcg``, Knyazev 2001) for at most ``maxiter`` iterations (about one HVP per iteration
and block column) and returns its current Ritz pair, flagged ``converged=False`` if the tolerance was not
met.  A Ritz value is a Rayleigh quotient, so it never exceeds the true ``lambda_max``.
Caveat (measured on MiniLM): when LOBPCG stops unconverged, scipy returns the iterate with the smallest
residual, which on a nearly low-rank Hessian can be the random start vector (Ritz value ~ 0).  Check
``residuals`` against the value, or prefer ``top_eigenpairs`` (eigsh) with a small ``ncv``.
"""

from __future__ import annotations

from typing import Any

import warnings

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, lobpcg
from tqdm.auto import tqdm

from .operators import as_linear_operator
from .results import EigenResult

__all__ = ["top_eigenpairs", "top_eigenpairs_lobpcg"]


def top_eigenpairs(
    operator: Any,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator via ``scipy.sparse.linalg.eigsh``.

    Args:
        operator: any object with ``dim`` and ``matvec(np.ndarray) -> np.ndarray`` (``HessianOperator``,
            ``MatrixOperator``).
        k: number of eigenpairs, ``1 <= k < dim`` (ARPACK's limit).
        which: ``"LA"`` (largest algebraic, default), ``"LM"``, ``"SA"`` or ``"BE"`` (see module docstring).
        tol: ARPACK relative accuracy of the Ritz values (0 = machine precision).
        maxiter: ARPACK restart limit (``None``: scipy's default ``10 * dim``).
        ncv: Lanczos basis size (``None``: scipy's default ``min(dim, max(2k + 1, 20))``).
        seed: seeds the start vector ``v0`` (standard normal), so runs are reproducible.
        progress: show a tqdm counter of Hessian-vector products.

    Returns:
        ``EigenResult`` with eigenvalues sorted descending, unit eigenvectors (columns), residual norms
        ``||H v - lambda v||`` and ``converged``.  On ``ArpackNoConvergence`` the converged pairs are
        returned with ``converged=False``.
    """
    dim = int(operator.dim)
    if not isinstance(k, int) or k < 1 or k >= dim:
        raise ValueError(f"k must be an int with 1 <= k < dim={dim} (ARPACK limit), got {k!r}")
    if which not in ("LA", "LM", "SA", "BE"):
        raise ValueError(f"which must be one of 'LA', 'LM', 'SA', 'BE', got {which!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    base = as_linear_operator(operator)
    bar = tqdm(desc="eigsh (HVPs)", unit="hvp", disable=not progress, leave=False)
    count = [0]

    def _mv(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        bar.update(1)
        return base.matvec(v)

    linop = LinearOperator((dim, dim), matvec=_mv, rmatvec=_mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(dim)
    converged = True
    try:
        values, vectors = eigsh(linop, k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0)
    except ArpackNoConvergence as err:
        converged = False
        values, vectors = err.eigenvalues, err.eigenvectors
    finally:
        bar.close()
    order = np.argsort(values)[::-1]
    values = np.asarray(values, dtype=np.float64)[order]
    vectors = np.asarray(vectors, dtype=np.float64)[:, order]
    residuals = _residuals(base, values, vectors, count)
    return EigenResult(
        eigenvalues=tuple(float(x) for x in values),
        residuals=tuple(residuals),
        converged=converged and values.shape[0] == k,
        num_matvecs=count[0],
        which=which,
        tol=float(tol),
        eigenvectors=vectors,
    )


def _residuals(base: Any, values: np.ndarray, vectors: np.ndarray, count: list[int]) -> list[float]:
    """``||H v_i - lambda_i v_i||`` of each Ritz pair (one Hessian-vector product each, counted in ``count``)."""
    out = []
    for i in range(values.shape[0]):
        out.append(float(np.linalg.norm(base.matvec(vectors[:, i]) - values[i] * vectors[:, i])))
        count[0] += 1
    return out


def top_eigenpairs_lobpcg(
    operator: Any,
    k: int = 1,
    *,
    maxiter: int = 20,
    tol: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EigenResult:
    """Top-``k`` (largest algebraic) eigenpairs by ``scipy.sparse.linalg.lobpcg`` on a fixed iteration budget.

    Args:
        operator: object with ``dim`` and ``matvec``.
        k: block size / number of pairs, ``1 <= k`` and ``5 k < dim`` (LOBPCG's regime).
        maxiter: iteration budget (each iteration costs about ``k`` Hessian-vector products).
        tol: residual tolerance (``None``: scipy's default ``sqrt(eps) * dim``).
        seed: seeds the random start block.
    Returns:
        ``EigenResult`` (``which="LA"``); ``converged`` is False when LOBPCG stopped at ``maxiter``.
    """
    dim = int(operator.dim)
    if not isinstance(k, int) or k < 1 or 5 * k >= dim:
        raise ValueError(f"k must be an int with 1 <= k and 5 * k < dim={dim} (LOBPCG regime), got {k!r}")
    if not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive int, got {maxiter!r}")
    base = as_linear_operator(operator)
    bar = tqdm(desc="lobpcg (HVPs)", unit="hvp", disable=not progress, leave=False)
    count = [0]

    def _mm(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x2 = x.reshape(dim, -1)
        out = np.column_stack([base.matvec(x2[:, j]) for j in range(x2.shape[1])])
        count[0] += x2.shape[1]
        bar.update(x2.shape[1])
        return out.reshape(x.shape)

    linop = LinearOperator((dim, dim), matvec=_mm, matmat=_mm, rmatvec=_mm, dtype=np.float64)
    x0 = np.random.default_rng(seed).standard_normal((dim, k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values, vectors = lobpcg(linop, x0, largest=True, maxiter=maxiter, tol=tol)
    bar.close()
    converged = not any("not reach" in str(w.message) or "converge" in str(w.message).lower() for w in caught)
    order = np.argsort(values)[::-1]
    values = np.asarray(values, dtype=np.float64)[order]
    vectors = np.asarray(vectors, dtype=np.float64)[:, order]
    vectors = vectors / np.linalg.norm(vectors, axis=0, keepdims=True)
    residuals = _residuals(base, values, vectors, count)
    return EigenResult(
        eigenvalues=tuple(float(x) for x in values),
        residuals=tuple(residuals),
        converged=converged,
        num_matvecs=count[0],
        which="LA",
        tol=float(tol) if tol is not None else float("nan"),
        eigenvectors=vectors,
    )
