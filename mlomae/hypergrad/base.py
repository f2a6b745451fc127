"""The one signature every hypergradient method shares.

Notation (DESIGN.md): lower parameters θ, lower loss f(θ, x) where x are the tensors the lower
loss reads that are themselves functions of the upper parameters λ (λ itself, or the parameters
of problems between), and an adjoint ``v = dF/dθ`` handed down from above. A method returns, for
each input x, its contribution to ``dF/dx``:

    implicit:  -(∂²f/∂x∂θ) H⁻¹ v      with H = ∂²f/∂θ²
    unroll:    (∂θ_K/∂x)ᵀ v            through the recorded differentiable lower steps

The engine chains these contributions along every path of a deeper graph; a method only ever
sees one lower problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor


@dataclass
class UnrollTrace:
    """The differentiable record of a lower problem's last steps.

    ``outputs`` are θ_K as tensors of a live autograd graph; ``sources[i]`` lists the graph
    tensors that stood for input ``i`` during those steps (the input itself, or snapshots of it
    taken when the input changed between steps).
    """

    outputs: list[Tensor]
    sources: list[list[Tensor]] = field(default_factory=list)
    steps: int = 0


@dataclass
class LowerLevel:
    """What a method may know about the lower problem, all as tensors and closures.

    ``loss`` evaluates f at the current θ on the lower problem's last batch, replaying the same
    randomness (masks, dropout) as the step that used that batch, so finite differences and
    Hessian-vector products see one function.

    ``reduce`` averages a list of derivatives of ``loss`` over data-parallel processes (the
    identity in one process); a method applies it to every such derivative it computes, so
    that its result is the one the whole batch would give.

    ``step_grads``, when the engine recorded the lower's last step, is that step's ∇_θ f
    (this process's batch, graph kept), at the parameters the step started from; the inputs
    then are the copies the step read. ``retain_step`` says another push reads the same
    record (or unrolled trace) after this one, so its graph must survive this push's backward.
    """

    params: list[Tensor]
    loss: Callable[[], Tensor]
    lr: float = 1.0
    trace: UnrollTrace | None = None
    reduce: Callable[[list], list] = field(default=lambda ts: ts)
    step_grads: list[Tensor] | None = None  # ∇_θ f of the last step, graph kept, if recorded
    retain_step: bool = False  # another push reads step_grads after this one: keep its graph


class HypergradMethod(Protocol):
    def __call__(self, v: Sequence[Tensor], lower: LowerLevel, inputs: Sequence[Tensor],
                 **options) -> list[Tensor | None]: ...


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(a: Sequence[Tensor]) -> Tensor:
    norms = torch._foreach_norm([x.detach() for x in a])   # one call, not two ops per tensor
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def inner_grad(lower: LowerLevel) -> list[Tensor]:
    """∇_θ f with its graph kept, for Hessian-vector and mixed products."""
    loss = lower.loss()
    grads = torch.autograd.grad(loss, lower.params, create_graph=True, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, lower.params)]


def hvp_fn(grads: Sequence[Tensor], params: Sequence[Tensor],
           reduce: Callable[[list], list] = lambda ts: ts) -> Callable[[list[Tensor]], list[Tensor]]:
    """w ↦ H w, reusing one graph of ∇_θ f."""

    def hvp(w: list[Tensor]) -> list[Tensor]:
        out = torch.autograd.grad(grads, params, grad_outputs=w, retain_graph=True,
                                  allow_unused=True)
        return reduce([o if o is not None else torch.zeros_like(p) for o, p in zip(out, params)])

    return hvp


def mixed_vjp(grads: Sequence[Tensor], inputs: Sequence[Tensor], w: Sequence[Tensor],
              reduce: Callable[[list], list] = lambda ts: ts,
              retain_graph: bool = False) -> list[Tensor | None]:
    """-(∂²f/∂x∂θ) w for each input x (None where f does not depend on x)."""
    out = torch.autograd.grad(grads, list(inputs), grad_outputs=list(w), allow_unused=True,
                              retain_graph=retain_graph)
    return reduce([None if o is None else -o for o in out])
