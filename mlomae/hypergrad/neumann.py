"""Implicit hypergradient with H⁻¹v ≈ η Σ_{k=0..K} (I − ηH)^k v."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import LowerLevel, hvp_fn, inner_grad, mixed_vjp
from .linalg import neumann_series


def neumann(v: Sequence[Tensor], lower: LowerLevel, inputs: Sequence[Tensor], *, iters: int = 5,
            eta: float | None = None, **_: object) -> list[Tensor | None]:
    """``eta`` defaults to the lower problem's learning rate (the series is then K unrolled
    gradient steps linearised at θ)."""
    grads = inner_grad(lower)
    step = lower.lr if eta is None else eta
    w = neumann_series(hvp_fn(grads, lower.params, lower.reduce), [t.detach() for t in v], iters, step)
    return mixed_vjp(grads, inputs, w, lower.reduce)
