"""Closed-form bilevel problems in float64, shared by the engine and hypergradient tests.

Ridge with per-feature penalties (learnable log λ):
    f(θ, λ) = ‖Xθ − y‖² / (2n) + ½ Σ_j e^{λ_j} θ_j²,    θ*(λ) = (XᵀX/n + diag e^λ)⁻¹ Xᵀy/n
    F(θ)    = ‖X_v θ − y_v‖² / (2m)
The implicit function theorem gives dF/dλ = −(∂²f/∂λ∂θ) H⁻¹ v with v = ∇F(θ*),
H = XᵀX/n + diag e^λ and ∂²f/∂λ_j∂θ_k = δ_jk e^{λ_j} θ_j.

Weighted least squares (learnable per-sample logits s, weights σ(s)):
    f(θ, s) = Σ_i σ(s_i)(x_iθ − y_i)² / (2n),    θ* = (Xᵀ D X)⁻¹ Xᵀ D y,  D = diag σ(s)/n
"""

from __future__ import annotations

import torch
from torch import nn

from mlomae.engine import Problem

DT = torch.float64


def regression(n: int, d: int, seed: int, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = X @ w + noise * torch.randn(n, generator=g, dtype=DT)
    return X, y


class Vector(nn.Module):
    def __init__(self, d: int, init: float = 0.0):
        super().__init__()
        self.value = nn.Parameter(torch.full((d,), init, dtype=DT))

    def forward(self):
        return self.value


class Const:
    """An endless data source that yields one fixed batch."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def ridge_inner(theta, loglam, X, y):
    return ((X @ theta - y) ** 2).mean() / 2 + 0.5 * (loglam.exp() * theta ** 2).sum()


def ridge_solution(loglam, X, y):
    n = X.shape[0]
    H = X.T @ X / n + torch.diag(loglam.exp())
    return torch.linalg.solve(H, X.T @ y / n), H


def ridge_ift(loglam, X, y, Xv, yv):
    """Exact hypergradient at θ*(λ) and θ* itself."""
    theta, H = ridge_solution(loglam, X, y)
    v = Xv.T @ (Xv @ theta - yv) / Xv.shape[0]
    return -(loglam.exp() * theta) * torch.linalg.solve(H, v), theta


def wls_inner(theta, s, X, y):
    return (torch.sigmoid(s) * (X @ theta - y) ** 2).mean() / 2


def wls_ift(s, X, y, Xv, yv):
    n = X.shape[0]
    D = torch.sigmoid(s) / n
    H = X.T @ (D[:, None] * X)
    theta = torch.linalg.solve(H, X.T @ (D * y))
    v = Xv.T @ (Xv @ theta - yv) / Xv.shape[0]
    u = torch.linalg.solve(H, v)
    # ∂²f/∂s_i∂θ = σ'(s_i)(x_iθ − y_i) x_i / n
    sp = torch.sigmoid(s) * (1 - torch.sigmoid(s))
    mixed = (sp * (X @ theta - y) / n)[:, None] * X  # [n, d]
    return -(mixed @ u), theta


class RidgeLower(Problem):
    def loss(self, batch):
        X, y = batch
        return ridge_inner(self.module(), self.read("hyper")(), X, y)


class ValUpper(Problem):
    """The validation loss of the lower problem it reads."""

    lower_name = "lower"

    def loss(self, batch):
        X, y = batch
        theta = self.read(self.lower_name)()
        return ((X @ theta - y) ** 2).mean() / 2


class WLSLower(Problem):
    def loss(self, batch):
        X, y = batch
        return wls_inner(self.module(), self.read("hyper")(), X, y)
