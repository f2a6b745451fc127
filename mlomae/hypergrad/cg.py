"""Implicit hypergradient with H⁻¹v from K conjugate-gradient iterations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from .base import LowerLevel, Method, hvp_fn, inner_grad, mixed_vjp, option, register
from .linalg import conjugate_gradient


@register
@dataclass(frozen=True)
class CG(Method):
    name = "cg"
    summary = "H⁻¹v by K conjugate-gradient iterations"
    iters: int = option(5, "K, the conjugate-gradient iterations", minimum=1)
    tol: float = option(1e-10, "stop early when ‖r‖ <= tol·‖v‖", minimum=0.0)

    @property
    def second_order(self) -> bool:
        return True

    @property
    def precise_loss(self) -> bool:
        return True   # H⁻¹ amplifies bf16 rounding of the Hessian products (cosine 0.88 for cg)

    def __call__(self, v: Sequence[Tensor], lower: LowerLevel,
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        grads = inner_grad(lower)
        w = conjugate_gradient(hvp_fn(grads, lower.params, lower.reduce), [t.detach() for t in v],
                               self.iters, self.tol)
        return mixed_vjp(grads, inputs, w, lower.reduce)
