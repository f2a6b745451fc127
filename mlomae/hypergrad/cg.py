"""Implicit hypergradient with H⁻¹v from K conjugate-gradient iterations."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ImplicitMethod, option, register
from .linalg import conjugate_gradient


@register
@dataclass(frozen=True)
class CG(ImplicitMethod):
    name = "cg"
    summary = "H⁻¹v by K conjugate-gradient iterations"
    iters: int = option(5, "K, the conjugate-gradient iterations", minimum=1)
    tol: float = option(1e-10, "stop early when ‖r‖ <= tol·‖v‖", minimum=0.0)

    def solve(self, hvp, v, lower):
        return conjugate_gradient(hvp, v, self.iters, self.tol)
