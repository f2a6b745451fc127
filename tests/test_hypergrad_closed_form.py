"""Every hypergradient method against numbers with a source: the implicit function theorem
solved with torch.linalg.solve, explicit autograd through K steps, higher, TorchOpt."""

from __future__ import annotations

import pytest
import torch

from bilevel import (DT, ridge_ift, ridge_inner, ridge_solution, regression, wls_ift, wls_inner)
from mlomae.hypergrad import METHODS, LowerLevel
from mlomae.hypergrad.linalg import conjugate_gradient


def rel(a, b):
    return float((a - b).norm() / b.norm())


def ridge_case(seed=0, n=200, d=5):
    X, y = regression(n, d, seed)
    Xv, yv = regression(100, d, seed + 1)
    loglam = torch.linspace(-1.0, 0.5, d, dtype=DT).requires_grad_(True)
    exact, theta_star = ridge_ift(loglam.detach(), X, y, Xv, yv)
    _, H = ridge_solution(loglam.detach(), X, y)
    theta = theta_star.clone().requires_grad_(True)
    lower = LowerLevel(params=[theta], loss=lambda: ridge_inner(theta, loglam, X, y), lr=0.5)
    v = [Xv.T @ (Xv @ theta.detach() - yv) / Xv.shape[0]]
    return lower, v, loglam, exact, H


def wls_case(seed=0, n=60, d=4):
    X, y = regression(n, d, seed, noise=0.5)
    Xv, yv = regression(40, d, seed + 1)
    s = (0.3 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)).requires_grad_(True)
    exact, theta_star = wls_ift(s.detach(), X, y, Xv, yv)
    H = X.T @ ((torch.sigmoid(s.detach()) / n)[:, None] * X)
    theta = theta_star.clone().requires_grad_(True)
    lower = LowerLevel(params=[theta], loss=lambda: wls_inner(theta, s, X, y), lr=1.0)
    v = [Xv.T @ (Xv @ theta.detach() - yv) / Xv.shape[0]]
    return lower, v, s, exact, H


@pytest.mark.parametrize("case", [ridge_case, wls_case])
def test_cg_converges_to_ift(case):
    """CG in d iterations solves the d-dimensional system exactly (up to rounding)."""
    lower, v, lam, exact, _ = case()
    (got,) = METHODS["cg"](iters=20, tol=0.0)(v, lower, [lam])
    assert rel(got, exact) < 1e-6


@pytest.mark.parametrize("case", [ridge_case, wls_case])
def test_neumann_converges_to_ift(case):
    """With η < 2/λ_max(H) the series converges geometrically to H⁻¹v."""
    lower, v, lam, exact, Hm = case()
    eta = 1.0 / float(torch.linalg.eigvalsh(Hm).max())
    (got,) = METHODS["neumann"](iters=3000, eta=eta)(v, lower, [lam])
    assert rel(got, exact) < 1e-6


def test_neumann_k_terms_formula():
    """Neumann with K terms equals η Σ_{k≤K} (I − ηH)^k v computed with the explicit Hessian."""
    lower, v, lam, _, Hm = ridge_case()
    theta = lower.params[0]
    eta, K = 0.3, 4
    I = torch.eye(Hm.shape[0], dtype=DT)
    w = eta * sum(torch.linalg.matrix_power(I - eta * Hm, k) for k in range(K + 1)) @ v[0]
    # −(∂²f/∂λ∂θ) w with ∂²f/∂λ_j∂θ_k = δ_jk e^{λ_j} θ_j
    expected = -(lam.detach().exp() * theta.detach()) * w
    (got,) = METHODS["neumann"](iters=K, eta=eta)(v, lower, [lam])
    assert rel(got, expected) < 1e-12


def test_darts_equals_its_formula_by_hand():
    """DARTS: −[∇_λ f(θ+εv) − ∇_λ f(θ−εv)]/(2ε), ε = α/‖v‖, written out for ridge:
    ∇_λ f = ½ e^λ θ²."""
    lower, v, lam, _, _ = ridge_case()
    theta = lower.params[0].detach().clone()
    alpha = 0.01
    eps = alpha / float(v[0].norm())
    gp = 0.5 * lam.detach().exp() * (theta + eps * v[0]) ** 2
    gm = 0.5 * lam.detach().exp() * (theta - eps * v[0]) ** 2
    expected = -(gp - gm) / (2 * eps)
    (got,) = METHODS["darts"](alpha=alpha)(v, lower, [lam])
    assert rel(got, expected) < 1e-10
    # θ is restored exactly
    assert torch.equal(lower.params[0].detach(), theta)
    # and, the finite difference of a quadratic being exact, DARTS is the H⁻¹ ≈ I formula
    assert rel(got, -(lam.detach().exp() * theta) * v[0]) < 1e-8


def test_first_order_drops_the_implicit_term():
    lower, v, lam, _, _ = ridge_case()
    assert METHODS["first_order"]()(v, lower, [lam]) == [None]


def test_cg_solver_matches_torchopt():
    """TorchOpt's solve_cg on the same SPD system, same iteration count."""
    torchopt = pytest.importorskip("torchopt")
    g = torch.Generator().manual_seed(3)
    A0 = torch.randn(8, 8, generator=g, dtype=DT)
    A = A0 @ A0.T + 0.5 * torch.eye(8, dtype=DT)
    b = torch.randn(8, generator=g, dtype=DT)
    for iters in (3, 8):
        ours = conjugate_gradient(lambda x: [A @ x[0]], [b], iters=iters)[0]
        theirs = torchopt.linalg.cg(lambda x: A @ x, b, maxiter=iters, rtol=0.0, atol=0.0)
        assert rel(ours, theirs) < 1e-10
    assert rel(conjugate_gradient(lambda x: [A @ x[0]], [b], iters=30)[0], torch.linalg.solve(A, b)) < 1e-9


def test_cg_hypergrad_matches_torchopt_solve_cg():
    """The whole cg hypergradient with H⁻¹v from torchopt.linear_solve.solve_cg."""
    torchopt = pytest.importorskip("torchopt")
    lower, v, lam, _, Hm = ridge_case()
    theta = lower.params[0]
    solver = torchopt.linear_solve.solve_cg(maxiter=3, rtol=0.0, atol=0.0)
    w = solver(lambda x: Hm @ x, v[0])
    expected = -(lam.detach().exp() * theta.detach()) * w
    (got,) = METHODS["cg"](iters=3, tol=0.0)(v, lower, [lam])
    assert rel(got, expected) < 1e-9
