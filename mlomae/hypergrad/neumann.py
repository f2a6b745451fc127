"""Implicit hypergradient with H⁻¹v ≈ η Σ_{k=0..K} (I − ηH)^k v."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ImplicitMethod, option, register
from .linalg import neumann_series


@register
@dataclass(frozen=True)
class Neumann(ImplicitMethod):
    """``eta`` defaults to the lower problem's learning rate (the series is then K unrolled
    gradient steps linearised at θ)."""

    name = "neumann"
    summary = "η Σ_{k=0..K} (I − ηH)^k v"
    iters: int = option(5, "K, the terms of the series after the first (0: ηv)", minimum=0)
    eta: float | None = option(None, "η (default: the lower's learning rate)", above=0.0)

    def solve(self, hvp, v, lower):
        return neumann_series(hvp, v, self.iters, lower.lr if self.eta is None else self.eta)
