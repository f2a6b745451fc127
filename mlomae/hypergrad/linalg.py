"""Linear solvers over lists of tensors, as plain functions that methods compose."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import dot

MatVec = Callable[[list[Tensor]], list[Tensor]]


def conjugate_gradient(matvec: MatVec, b: list[Tensor], iters: int, tol: float = 0.0,
                       ) -> list[Tensor]:
    """Solve A x = b for symmetric positive definite A, from x = 0.

    The textbook recurrence (Nocedal & Wright, Alg. 5.2): r = b - A x, p = r,
    α = rᵀr / pᵀAp, x += α p, r -= α Ap, β = r'ᵀr' / rᵀr, p = r' + β p.
    Stops after ``iters`` iterations or when ‖r‖ <= tol·‖b‖.
    Updates are in place and A p is dropped before the next product, so memory does not
    depend on ``iters`` (benchmarks/README.md, question 4).
    """
    x = [bi.detach().new_zeros(bi.shape) for bi in b]
    r = [bi.detach().clone() for bi in b]
    p = [ri.clone() for ri in r]
    rr = dot(r, r)
    stop = (tol * rr.sqrt()) if tol > 0 else None
    for _ in range(iters):
        if stop is not None and rr.sqrt() <= stop:
            break
        ap = [a.detach() for a in matvec(p)]
        alpha = rr / dot(p, ap)
        torch._foreach_add_(x, torch._foreach_mul(p, alpha))
        torch._foreach_sub_(r, torch._foreach_mul(ap, alpha))
        del ap
        rr_new = dot(r, r)
        torch._foreach_mul_(p, rr_new / rr)
        torch._foreach_add_(p, r)
        rr = rr_new
    return x


def neumann_series(matvec: MatVec, b: list[Tensor], iters: int, eta: float) -> list[Tensor]:
    """η Σ_{k=0..K} (I − ηA)^k b, which tends to A⁻¹b when ‖I − ηA‖ < 1 (in place, as above)."""
    term = [bi.detach().clone() for bi in b]
    total = [t.clone() for t in term]
    for _ in range(iters):
        at = [a.detach() for a in matvec(term)]
        torch._foreach_add_(term, at, alpha=-eta)
        del at
        torch._foreach_add_(total, term)
    torch._foreach_mul_(total, eta)
    return total
