"""Exact reverse-mode differentiation through the lower problem's recorded steps.

The engine runs the lower problem's steps differentiably (optimizer update included, see
``mlomae.engine.diffopt``) and hands the record here; this is one vector-Jacobian product
(∂θ_K/∂x)ᵀ v, summed over every tensor that stood for x during those steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .base import Keep, LowerLevel, Method, register


@register
@dataclass(frozen=True)
class Unroll(Method):
    name = "unroll"
    summary = ("exact reverse mode through the lower's recorded steps, optimizer update "
               "included (SGD with momentum/Nesterov/weight decay, Adam, AdamW)")
    reference = True

    @property
    def keeps(self) -> Keep:
        return Keep.UNROLLED

    @property
    def second_order(self) -> bool:
        return True

    def __call__(self, v: Sequence[Tensor], lower: LowerLevel,
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        trace = lower.trace
        if trace is None or trace.steps == 0:
            raise RuntimeError("unroll needs the lower problem's differentiable steps, and none "
                               "were recorded since its last use")
        flat = [s for group in trace.sources for s in group]
        if not flat:
            return [None for _ in inputs]
        pairs = [(o, t) for o, t in zip(trace.outputs, v) if o.requires_grad]
        if not pairs:
            return [None for _ in inputs]
        grads = torch.autograd.grad([o for o, _ in pairs], flat,
                                    grad_outputs=[t.detach() for _, t in pairs],
                                    allow_unused=True, retain_graph=lower.retain_step)
        out: list[Tensor | None] = []
        i = 0
        for group in trace.sources:
            acc = None
            for g in grads[i:i + len(group)]:
                if g is not None:
                    acc = g if acc is None else acc + g
            out.append(acc)
            i += len(group)
        # each process differentiated its own share of the lower batches (the recorded steps
        # averaged gradients across processes differentiably): the average is the whole batch's
        return lower.reduce(out)
