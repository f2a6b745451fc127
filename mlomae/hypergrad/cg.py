"""Implicit hypergradient with H⁻¹v from K conjugate-gradient iterations."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import LowerLevel, hvp_fn, inner_grad, mixed_vjp
from .linalg import conjugate_gradient


def cg(v: Sequence[Tensor], lower: LowerLevel, inputs: Sequence[Tensor], *, iters: int = 5,
       tol: float = 1e-10, **_: object) -> list[Tensor | None]:
    grads = inner_grad(lower)
    w = conjugate_gradient(hvp_fn(grads, lower.params, lower.reduce), [t.detach() for t in v], iters, tol)
    return mixed_vjp(grads, inputs, w, lower.reduce)
