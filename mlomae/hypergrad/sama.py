"""SAMA (Choe et al. 2023, "Making Scalable Meta Learning Practical"): DARTS's central finite
difference, with v first passed through the Jacobian of the lower optimizer's update.

For a lower problem trained by Adam the best-response Jacobian is not −lr·I but the derivative
of Adam's step −lr·m_t/(√v_t + ε) with respect to the gradient g that produced it, taken
elementwise (Betty's ``precondition_adam``, bias correction left out as there):

    ∂/∂g [m_t/√v_t] = [(1−β₁)β₂ v_{t−1} − β₁(1−β₂) g m_{t−1}] / (√v_t + ε)³
    m_{t−1} = (m_t − (1−β₁) g)/β₁,  v_{t−1} = (v_t − (1−β₂) g²)/β₂

so v' = lr · that ⊙ v, and the push is −(∂²f/∂x∂θ) v' by central differences at θ ± εv',
ε = α/‖v'‖ (the mixed term from two first-order evaluations, as in DARTS; no Hessian). With SGD
(or no optimizer) v' = v and SAMA is DARTS with the same α. g is the gradient the lower's
optimizer last applied (``Keep.STEP_GRADIENT``); before the lower's first step Adam has no state
and the push is zero, as in Betty.

``exact=True`` takes the mixed term's limit ε → 0 instead, −∇_x(∇_θ f · v'), by a double backward
through the graph the lower's last step kept (``Keep.STEP_GRAPH``, as exact DARTS: at the
parameters that step started from, no forward pass of its own; one at the current θ when there
is no such record). Cheap where θ is small next to what lies between x and the loss (MLO-MAE's
linear head on its encoder); it needs second derivatives of f in θ. The steps then keep the
applied gradient as well, for the preconditioner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .base import Keep, LowerLevel, Method, inner_grad, mixed_vjp, option, register
from .darts import finite_difference


@register
@dataclass(frozen=True)
class SAMA(Method):
    name = "sama"
    summary = ("DARTS's finite difference on v passed through the Jacobian of the lower's Adam "
               "update (identity for SGD)")
    alpha: float = option(1.0, "α: the step ε = α/‖v'‖ of the finite difference", above=0.0)
    exact: bool = option(False, "the limit ε → 0 by double backward, on the lower's last step")

    @property
    def keeps(self) -> Keep:
        return Keep.STEP_GRAPH if self.exact else Keep.STEP_GRADIENT

    @property
    def applied_gradient(self) -> bool:
        return True

    @property
    def second_order(self) -> bool:
        return self.exact

    @property
    def precise_loss(self) -> bool:
        return not self.exact

    def unsupported(self, optimizer: torch.optim.Optimizer | None) -> str | None:
        if optimizer is None or isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
            return None   # AdamW subclasses Adam in torch >= 2.6
        return (f"sama preconditions for sgd, adam and adamw lower optimizers, not "
                f"{type(optimizer).__name__}")

    def __call__(self, v: Sequence[Tensor], lower: LowerLevel,
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        vs = precondition([t.detach() for t in v], lower)
        if self.exact:
            recorded = lower.step_grads is not None
            grads = lower.step_grads if recorded else inner_grad(lower)
            return mixed_vjp(grads, inputs, vs, lower.reduce,
                             retain_graph=recorded and lower.retain_step)
        return finite_difference(vs, lower, inputs, self.alpha)


def precondition(vs: list[Tensor], lower: LowerLevel) -> list[Tensor]:
    """v' = lr · ∂(Adam's step direction)/∂g ⊙ v per parameter; v itself for SGD."""
    opt = lower.optimizer
    if not isinstance(opt, torch.optim.Adam):
        return vs
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    if lower.step_gradient is None and any(opt.state.get(p) for p in lower.params):
        raise RuntimeError("sama needs the gradient the lower problem's optimizer last applied, "
                           "and none was kept (is the lower problem unrolled for another push?)")
    grads = lower.step_gradient or [None] * len(vs)
    out = []
    with torch.no_grad():
        for vec, p, g in zip(vs, lower.params, grads):
            group, state = groups[id(p)], opt.state.get(p, {})
            if not state or g is None:
                out.append(torch.zeros_like(vec))
                continue
            b1, b2 = group["betas"]
            m, s = state["exp_avg"], state["exp_avg_sq"]
            m_old = (m - (1 - b1) * g) / b1 if b1 != 0 else torch.zeros_like(m)
            s_old = (s - (1 - b2) * g * g) / b2 if b2 != 0 else torch.zeros_like(s)
            scale = ((1 - b1) * b2 * s_old - b1 * (1 - b2) * g * m_old) / (s.sqrt() + group["eps"]) ** 3
            out.append(vec * scale * group["lr"])
    return out
