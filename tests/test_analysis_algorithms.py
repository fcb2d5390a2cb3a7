"""Closed-form checks of the analysis algorithms on quadratics L(w) = 0.5 w^T H w (+ known gradient):
eigsh eigenvalues, Hutchinson trace/diagonal, concentration curves, per-tensor scores, worst-case sharpness
(exact trust-region maximiser as reference), landscape slices and exact parameter restore."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import nn

from flatpeft.analysis import (
    ConcentrationCurve,
    HessianOperator,
    MatrixOperator,
    concentration_curve,
    concentration_curves,
    filter_normalize,
    hutchinson,
    landscape_1d,
    landscape_2d,
    plot_concentration,
    plot_landscape_1d,
    plot_landscape_2d,
    random_direction,
    symmetric_grid,
    tensor_scores,
    top_eigenpairs,
    worst_case_sharpness,
)
from flatpeft.analysis.pipeline import flatpo_selection_share


pytestmark = pytest.mark.usefixtures("single_thread")

EIGS = np.array([10.0, 6.0, 3.5, 2.0, 1.5, 1.0, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2, -0.3, -0.5, -0.7, -1.0])


def make_h(eigs=EIGS, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigs.size, eigs.size)))
    return (q * eigs) @ q.T


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T H w + c^T w, w stored as two tensors (3x4 and 8) to exercise flattening order."""

    def __init__(self, H: np.ndarray, w: np.ndarray, c: np.ndarray | None = None) -> None:
        super().__init__()
        w = torch.as_tensor(w, dtype=torch.float64)
        self.a = nn.Parameter(w[:12].reshape(3, 4).clone())
        self.b = nn.Parameter(w[12:].clone())
        self.frozen = nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
        self.register_buffer("H", torch.as_tensor(H, dtype=torch.float64))
        self.register_buffer("c", torch.zeros(H.shape[0], dtype=torch.float64) if c is None else torch.as_tensor(c))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.a.reshape(-1), self.b])


def quad_loss(model: Quadratic, batch) -> torch.Tensor:
    w = model.flat()
    return 0.5 * w @ model.H @ w + model.c @ w + 0.0 * model.frozen.sum()


def quad_op(H, w, c=None):
    model = Quadratic(H, w, c)
    return model, HessianOperator(model, quad_loss, [None])


def trust_region_max(g: np.ndarray, A: np.ndarray, r: float) -> float:
    """Exact max of g.e + 0.5 e^T A e over ||e|| <= r (generic case: boundary solution, e = (mu I - A)^-1 g)."""
    lam, q = np.linalg.eigh(A)
    gq = q.T @ g
    lo = max(lam.max(), 0.0) + 1e-12

    def phi(mu):
        return np.linalg.norm(gq / (mu - lam)) - r

    hi = lo + 1.0
    while phi(hi) > 0:
        hi *= 2
    mu = brentq(phi, lo, hi, xtol=1e-15, rtol=1e-15)
    e = q @ (gq / (mu - lam))
    return float(g @ e + 0.5 * e @ A @ e)


# ---------------------------------------------------------------- eigenvalues
def test_eigsh_top_k_exact_on_quadratic_through_hessian_operator():
    H = make_h()
    _, op = quad_op(H, np.random.default_rng(1).standard_normal(20))
    res = top_eigenpairs(op, 3, tol=0.0, seed=0)
    np.testing.assert_allclose(res.eigenvalues, EIGS[:3], atol=1e-6)
    assert list(res.eigenvalues) == sorted(res.eigenvalues, reverse=True)
    assert res.converged and max(res.residuals) < 1e-6 and res.which == "LA"
    # eigenvector of 10 is the first column of the construction (up to sign)
    v = res.eigenvectors[:, 0]
    np.testing.assert_allclose(H @ v, 10.0 * v, atol=1e-6)
    json.loads(res.to_json())  # strict JSON, eigenvectors left out
    assert "eigenvectors" not in res.to_dict()


def test_eigsh_la_vs_lm_on_negative_dominated_spectrum():
    eigs = np.array([2.0, 1.0, 0.5, -0.2, -5.0, -8.0])
    op = MatrixOperator(make_h(eigs, seed=3))
    assert top_eigenpairs(op, 1, tol=0.0).eigenvalues[0] == pytest.approx(2.0, abs=1e-8)
    assert top_eigenpairs(op, 1, which="LM", tol=0.0).eigenvalues[0] == pytest.approx(-8.0, abs=1e-8)
    with pytest.raises(ValueError, match="k must"):
        top_eigenpairs(op, 6)
    with pytest.raises(ValueError, match="which"):
        top_eigenpairs(op, 1, which="XX")


# ---------------------------------------------------------------- Hutchinson
def test_hutchinson_trace_and_diagonal_within_four_standard_errors():
    H = make_h()
    _, op = quad_op(H, np.zeros(20))
    trace, diag = hutchinson(op, 400, seed=5)
    assert trace.num_samples == 400 and trace.std_error > 0
    assert abs(trace.trace - np.trace(H)) <= 4 * trace.std_error
    # theoretical std error of the trace estimate: sqrt(2 (||H||_F^2 - sum H_ii^2) / n)
    theory = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 400)
    assert trace.std_error == pytest.approx(theory, rel=0.2)
    z = np.abs(diag.diagonal - np.diag(H)) / diag.std_error
    assert z.max() <= 4.0
    assert diag.trace == pytest.approx(trace.trace, abs=1e-9)
    # same seed -> same estimate; another seed differs
    assert hutchinson(op, 400, seed=5)[0].trace == trace.trace
    assert hutchinson(op, 400, seed=6)[0].trace != trace.trace


def test_hutchinson_exact_for_diagonal_matrix():
    d = np.array([3.0, -1.0, 0.5, 2.0])
    trace, diag = hutchinson(MatrixOperator(np.diag(d)), 5, seed=0)
    assert trace.trace == pytest.approx(d.sum(), abs=1e-15) and trace.std_error == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(diag.diagonal, d, atol=1e-15)
    np.testing.assert_allclose(diag.std_error, 0.0, atol=1e-15)
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson(MatrixOperator(np.diag(d)), 0)


# ---------------------------------------------------------------- concentration
def test_concentration_curve_exact_points():
    c = concentration_curve([1.0, 4.0, 2.0, 3.0], granularity="tensor")
    assert c.points == ((0.0, 0.0), (25.0, 0.4), (50.0, 0.7), (75.0, 0.9), (100.0, 1.0))
    assert c.total == 10.0 and c.num_dimensions == 4
    assert c.share_at(12.5) == pytest.approx(0.2)
    curves = concentration_curves(np.array([1.0, 3.0, 4.0, 2.0]), [2, 2])
    assert curves["tensor"].points == ((0.0, 0.0), (50.0, 0.6), (100.0, 1.0))
    assert curves["element"].points == ((0.0, 0.0), (25.0, 0.4), (50.0, 0.7), (75.0, 0.9), (100.0, 1.0))
    uniform = concentration_curve(np.ones(5000), granularity="element")
    for x, y in uniform.points:
        assert y == pytest.approx(x / 100, abs=1e-12)
    assert (0.05, 0.0005) in [(x, round(y, 10)) for x, y in uniform.points]
    with pytest.raises(ValueError, match="non-negative"):
        concentration_curve([1.0, -1.0], granularity="tensor")
    with pytest.raises(ValueError, match="granularity"):
        concentration_curve([1.0], granularity="layer")


def test_concentration_of_squared_gradient_on_diagonal_quadratic():
    """Diagonal H and point w: g = H w, so the element curve is the sorted shares of (H_ii w_i)^2."""
    d = np.arange(1.0, 21.0)
    w = np.ones(20)
    _, op = quad_op(np.diag(d), w)
    loss, grads = op.gradient()
    assert loss == pytest.approx(0.5 * d.sum())
    g = op.flatten(grads)
    np.testing.assert_allclose(g, d * w, atol=1e-14)
    curves = concentration_curves(g**2, op.numels)
    sq = np.sort(d**2)[::-1]
    assert curves["element"].share_at(5.0) == pytest.approx(sq[0] / sq.sum(), abs=1e-14)
    # tensor a holds elements 1..12, tensor b 13..20
    ta, tb = (d[:12] ** 2).sum(), (d[12:] ** 2).sum()
    assert curves["tensor"].points[1] == pytest.approx((50.0, max(ta, tb) / (ta + tb)), abs=1e-14)
    assert flatpo_selection_share([ta, tb], fractions=(0.05, 1.0)) == {
        "0.05": pytest.approx(max(ta, tb) / (ta + tb)),
        "1": pytest.approx(1.0),
    }


# ---------------------------------------------------------------- per-tensor scores
def test_tensor_scores_closed_form():
    H = make_h()
    w = np.random.default_rng(2).standard_normal(20)
    c = np.random.default_rng(3).standard_normal(20)
    _, op = quad_op(H, w, c)
    rho = 0.1
    s = tensor_scores(op, rho=rho)
    g = H @ w + c
    L = lambda x: 0.5 * x @ H @ x + c @ x
    assert s.names == ("a", "b") and s.numels == (12, 8)
    np.testing.assert_allclose(s.grad_norm, [np.linalg.norm(g[:12]), np.linalg.norm(g[12:])], rtol=1e-12)
    for i, sl in enumerate([slice(0, 12), slice(12, 20)]):
        e = np.zeros(20)
        e[sl] = rho * g[sl] / np.linalg.norm(g[sl])
        assert s.rho_increase[i] == pytest.approx(L(w + e) - L(w), abs=1e-12)
    e = rho * g / np.linalg.norm(g)
    assert s.global_rho_increase == pytest.approx(L(w + e) - L(w), abs=1e-12)
    json.loads(s.to_json())


# ---------------------------------------------------------------- worst-case sharpness
def test_worst_case_at_minimum_equals_half_rho_sq_lambda_max():
    H = make_h()
    _, op = quad_op(H, np.zeros(20))
    rho = 0.05
    res = worst_case_sharpness(op, rho, steps=80, seed=0)
    assert res.sharpness == pytest.approx(0.5 * rho**2 * EIGS[0], rel=1e-4)
    assert res.sharpness <= 0.5 * rho**2 * EIGS[0] + 1e-15  # a lower bound of the true maximum
    assert res.perturbation_norm == pytest.approx(rho, rel=1e-9)


def test_worst_case_matches_exact_trust_region_and_beats_sam_direction():
    H = make_h()
    w = np.random.default_rng(4).standard_normal(20) * 0.1
    model, op = quad_op(H, w)
    before = [p.detach().clone() for p in model.parameters()]
    rho = 0.3
    g = H @ w
    res = worst_case_sharpness(op, rho, steps=60)
    e = rho * g / np.linalg.norm(g)
    sam = g @ e + 0.5 * e @ H @ e
    assert res.sam_sharpness == pytest.approx(sam, abs=1e-13)
    assert res.sharpness >= res.sam_sharpness
    exact = trust_region_max(g, H, rho)
    assert exact > sam + 1e-3  # the SAM direction is not the maximiser here
    assert res.sharpness == pytest.approx(exact, rel=1e-4)
    assert res.sharpness <= exact + 1e-12
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_adaptive_worst_case_matches_trust_region_in_scaled_coordinates():
    H = make_h()
    w = np.random.default_rng(5).standard_normal(20)
    _, op = quad_op(H, w)
    rho, eta = 0.2, 0.01
    t = np.abs(w) + eta
    res = worst_case_sharpness(op, rho, steps=80, adaptive=True, eta=eta)
    g = H @ w
    exact = trust_region_max(t * g, t[:, None] * H * t[None, :], rho)
    # ASAM first-order start eps = rho T^2 g / ||T g||
    e = rho * t**2 * g / np.linalg.norm(t * g)
    assert res.sam_sharpness == pytest.approx(g @ e + 0.5 * e @ H @ e, abs=1e-12)
    assert res.sharpness == pytest.approx(exact, rel=1e-4)
    assert res.adaptive and res.eta == eta


def test_worst_case_restores_parameters_on_exception():
    H = make_h()
    model = Quadratic(H, np.random.default_rng(6).standard_normal(20))
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("fail in ascent")
        return quad_loss(m, b)

    with pytest.raises(RuntimeError, match="ascent"):
        worst_case_sharpness(HessianOperator(model, flaky, [None]), 0.1, steps=5)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="rho"):
        worst_case_sharpness(HessianOperator(model, quad_loss, [None]), 0.0)


# ---------------------------------------------------------------- landscapes
def test_filter_normalize_row_norms():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    p[2] = 0.0
    d = filter_normalize(torch.randn(5, 7, dtype=torch.float64, generator=gen), p)
    np.testing.assert_allclose(d.norm(dim=1).numpy(), p.norm(dim=1).numpy(), rtol=1e-12, atol=1e-12)
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    assert float(filter_normalize(torch.randn(4, dtype=torch.float64, generator=gen), b).norm()) == pytest.approx(
        float(b.norm())
    )
    g = symmetric_grid(1.0, 21)
    assert g[10] == 0.0 and g[0] == -1.0 and g[-1] == 1.0


def test_landscape_slices_closed_form_center_and_exact_restore(tmp_path):
    H = make_h()
    w = np.random.default_rng(7).standard_normal(20)
    model, op = quad_op(H, w)
    before = [p.detach().clone() for p in model.parameters()]
    s1 = landscape_1d(op, radius=0.5, num=11, seed=3)
    assert s1.losses[5] == op.loss() == s1.center_loss
    d = op.flatten(random_direction(op.params, torch.Generator().manual_seed(3)))
    L = lambda x: 0.5 * x @ H @ x
    np.testing.assert_allclose(s1.losses, [L(w + a * d) for a in s1.alphas], rtol=1e-12)
    s2 = landscape_2d(op, radius=0.5, num=5, seed=3)
    assert s2.losses.shape == (5, 5) and s2.losses[2, 2] == s2.center_loss
    gen = torch.Generator().manual_seed(3)
    d1 = op.flatten(random_direction(op.params, gen))
    d2 = op.flatten(random_direction(op.params, gen))
    ref = [[L(w + a * d1 + b * d2) for b in s2.betas] for a in s2.alphas]
    np.testing.assert_allclose(s2.losses, ref, rtol=1e-12)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for path in (
        plot_landscape_1d(s1, tmp_path / "l1.png"),
        plot_landscape_2d(s2, tmp_path / "l2.png"),
        plot_concentration({"tensor": ConcentrationCurve("tensor", "grad_sq", 2, 1.0, ((0, 0), (50, 0.8), (100, 1)))}, tmp_path / "c.png"),
    ):
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(s2.save(tmp_path / "s2.json").read_text())
    assert saved["alphas"] == list(s2.alphas) and saved["losses"] == s2.losses.tolist()
