"""DARTS: H⁻¹ ≈ I and the mixed term by central finite differences.

    -(∂²f/∂x∂θ) v ≈ -[∇_x f(θ + εv) − ∇_x f(θ − εv)] / (2ε),   ε = α / ‖v‖

Two first-order evaluations of f; no second derivative, so it also runs through fused attention.
It is the implicit (best-response) form, as in Betty: no factor of the lower's learning rate, so
its push keeps its size while the lower's schedule decays, where a one-step unroll's
(−lr·∂²f/∂x∂θ) shrinks with it; and no preconditioner, where SAMA passes v through the
Jacobian of the lower's Adam step, learning rate included.
θ is restored bit for bit afterwards (copied back, not re-added).

``exact=True`` computes the limit ε → 0 instead, −∇_x(∇_θ f · v), by a double backward through
∇_θ f. The lower's last step then keeps that gradient's graph (``Keep.STEP_GRAPH``), so the mixed
term is taken at the parameters the step started from, as in DARTS, and costs no forward pass of
its own; without such a record (the upper stepped first), one forward at the current θ. When θ
is small next to what lies between x and the loss (a linear head on a deep encoder: MLO-MAE's
fine-tune level) that is one backward through the encoder instead of two forwards and backwards
(benchmarks/README.md, question 2); it needs second derivatives of f in θ, so not where θ sits
under fused attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .base import Keep, LowerLevel, Method, inner_grad, mixed_vjp, norm, option, register


@register
@dataclass(frozen=True)
class Darts(Method):
    name = "darts"
    summary = ("H⁻¹ ≈ I; mixed term by central differences at θ ± εv, ε = α/‖v‖, or with "
               "exact its limit −∇_x(∇_θf·v) by double backward through the graph the lower's "
               "last step kept")
    alpha: float = option(0.01, "α: the step ε = α/‖v‖ of the finite difference", above=0.0)
    scale: float = option(1.0, "a factor on the result", above=0.0)
    exact: bool = option(False, "the limit ε → 0 by double backward, on the lower's last step")

    @property
    def keeps(self) -> Keep:
        return Keep.STEP_GRAPH if self.exact else Keep.NOTHING

    @property
    def second_order(self) -> bool:
        return self.exact

    @property
    def precise_loss(self) -> bool:
        return not self.exact

    def __call__(self, v: Sequence[Tensor], lower: LowerLevel,
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        vs = [t.detach() for t in v]
        if self.exact:
            recorded = lower.step_grads is not None
            grads = lower.step_grads if recorded else inner_grad(lower)
            out = mixed_vjp(grads, inputs, vs, lower.reduce,
                            retain_graph=recorded and lower.retain_step)
            return [None if o is None else o.mul_(self.scale) for o in out]
        return finite_difference(vs, lower, inputs, self.alpha, self.scale)


def finite_difference(vs: list[Tensor], lower: LowerLevel, inputs: Sequence[Tensor],
                      alpha: float, scale: float = 1.0) -> list[Tensor | None]:
    """-[∇_x f(θ + εv) − ∇_x f(θ − εv)] · scale / (2ε) with ε = α/‖v‖, θ restored bit for bit."""
    inputs = list(inputs)
    params = list(lower.params)
    size = float(norm(vs))
    if not math.isfinite(size):
        # an adjoint that overflowed (fp16 loss scaling): nothing to difference, and the
        # upper step must see a non-finite hypergradient (then it is skipped as an overflow)
        return lower.reduce([torch.full_like(x, float("nan")) for x in inputs])
    eps = alpha / (size + 1e-12)
    saved = [p.detach().clone() for p in params]

    def grad_at(sign: float) -> tuple[Tensor | None, ...]:
        with torch.no_grad():  # one foreach call per list, not one op per tensor
            torch._foreach_copy_(params, saved)
            torch._foreach_add_(params, vs, alpha=sign * eps)
        loss = lower.loss()
        return torch.autograd.grad(loss, inputs, allow_unused=True)

    try:
        plus = grad_at(+1.0)
        minus = grad_at(-1.0)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
    out: list[Tensor | None] = []
    for gp, gm in zip(plus, minus):
        if gp is None and gm is None:
            out.append(None)
            continue
        gp = torch.zeros_like(gm) if gp is None else gp
        gm = torch.zeros_like(gp) if gm is None else gm
        out.append((gm - gp).mul_(scale / (2 * eps)))
    return lower.reduce(out)  # linear in the lower batch: average over data-parallel processes
