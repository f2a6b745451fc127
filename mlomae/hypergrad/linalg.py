"""Linear solvers over lists of tensors, as plain functions that methods compose."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .base import dot

MatVec = Callable[[list[Tensor]], list[Tensor]]


def conjugate_gradient(matvec: MatVec, b: list[Tensor], iters: int, tol: float = 0.0,
                       ) -> list[Tensor]:
    """Solve A x = b for symmetric positive definite A, from x = 0.

    The textbook recurrence (Nocedal & Wright, Alg. 5.2): r = b - A x, p = r,
    α = rᵀr / pᵀAp, x += α p, r -= α Ap, β = r'ᵀr' / rᵀr, p = r' + β p.
    Stops after ``iters`` iterations or when ‖r‖ <= tol·‖b‖.
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
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rr_new = dot(r, r)
        beta = rr_new / rr
        p = [ri + beta * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x


def neumann_series(matvec: MatVec, b: list[Tensor], iters: int, eta: float) -> list[Tensor]:
    """η Σ_{k=0..K} (I − ηA)^k b, which tends to A⁻¹b when ‖I − ηA‖ < 1."""
    term = [bi.detach().clone() for bi in b]
    total = [t.clone() for t in term]
    for _ in range(iters):
        at = matvec(term)
        term = [t - eta * a.detach() for t, a in zip(term, at)]
        total = [s + t for s, t in zip(total, term)]
    return [eta * s for s in total]
