"""DARTS: H⁻¹ ≈ I and the mixed term by central finite differences.

    -(∂²f/∂x∂θ) v ≈ -[∇_x f(θ + εv) − ∇_x f(θ − εv)] / (2ε),   ε = α / ‖v‖

Two first-order evaluations of f; no second derivative, so it also runs through fused attention.
θ is restored bit for bit afterwards (copied back, not re-added).

``exact=True`` computes the limit ε → 0 instead, −∇_x(∇_θ f · v), by a double backward through
∇_θ f. In the engine the lower's last step keeps that gradient's graph (``lower.step_grads``), so
the mixed term is taken at the parameters the step started from, as in DARTS, and costs no
forward pass of its own; called without it, one forward at the current θ. When θ is small next to
what lies between x and the loss (a linear head on a deep encoder: MLO-MAE's fine-tune level)
that is one backward through the encoder instead of two forwards and backwards
(benchmarks/README.md, question 2); it needs second derivatives of f in θ, so not where θ sits
under fused attention.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LowerLevel, inner_grad, mixed_vjp, norm


def darts(v: Sequence[Tensor], lower: LowerLevel, inputs: Sequence[Tensor], *, alpha: float = 0.01,
          scale: float = 1.0, exact: bool = False, **_: object) -> list[Tensor | None]:
    inputs = list(inputs)
    params = list(lower.params)
    vs = [t.detach() for t in v]
    if exact:
        recorded = lower.step_grads is not None
        grads = lower.step_grads if recorded else inner_grad(lower)
        out = mixed_vjp(grads, inputs, vs, lower.reduce, retain_graph=recorded and lower.retain_step)
        return [None if o is None else o.mul_(scale) for o in out]
    eps = alpha / (float(norm(vs)) + 1e-12)
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
