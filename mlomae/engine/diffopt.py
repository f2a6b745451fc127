"""Differentiable optimizer updates that reproduce ``torch.optim`` step for step.

``unroll`` differentiates through a lower problem's updates, so they must be written as
out-of-place tensor functions. Each function here takes the torch optimizer (for its
hyper-parameters and state), the current parameters and gradients as graph tensors, and returns
the new parameters and the new state, without touching the optimizer. ``write_back`` then stores
the detached state in the optimizer, so ordinary steps continue exactly where the
differentiable ones stopped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

State = dict[str, Any]


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return group
    raise KeyError("parameter not managed by this optimizer")


def supported(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt whose derivative at 0 is 0 instead of inf (Adam's second moment starts at 0)."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def step(optimizer: torch.optim.Optimizer, real: list[Tensor], params: list[Tensor],
         grads: list[Tensor], states: list[State]) -> tuple[list[Tensor], list[State]]:
    """One update of ``params`` (graph tensors standing for the optimizer's ``real``
    parameters) with ``grads``; ``states`` as from :func:`initial_states`."""
    groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}  # not a scan per tensor
    new_params, new_states = [], []
    for r, p, g, s in zip(real, params, grads, states):
        group = groups.get(id(r)) or _group_of(optimizer, r)
        if isinstance(optimizer, torch.optim.SGD):
            np_, ns = _sgd(group, p, g, s)
        elif isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam in torch >= 2.6
            np_, ns = _adam(group, p, g, s, decoupled=_decoupled(optimizer, group))
        else:
            raise TypeError(f"no differentiable update for {type(optimizer).__name__}; "
                            "use sgd, adam or adamw with unroll")
        new_params.append(np_)
        new_states.append(ns)
    return new_params, new_states


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))


def _sgd(group: dict, p: Tensor, g: Tensor, s: State) -> tuple[Tensor, State]:
    lr, mom, damp = group["lr"], group["momentum"], group["dampening"]
    wd, nesterov = group["weight_decay"], group["nesterov"]
    if group.get("maximize", False):
        g = -g
    if wd != 0:
        g = g + wd * p
    if mom != 0:
        buf = s.get("momentum_buffer")
        buf = g if buf is None else buf * mom + (1 - damp) * g
        g = g + mom * buf if nesterov else buf
        s = {"momentum_buffer": buf}
    return p - lr * g, s


def _adam(group: dict, p: Tensor, g: Tensor, s: State, decoupled: bool) -> tuple[Tensor, State]:
    if group.get("amsgrad", False):
        raise TypeError("amsgrad has no differentiable update here")
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if group.get("maximize", False):
        g = -g
    t = float(s.get("step", 0)) + 1
    if wd != 0:
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    m = s.get("exp_avg")
    v = s.get("exp_avg_sq")
    m = torch.zeros_like(p) if m is None else m
    v = torch.zeros_like(p) if v is None else v
    m = torch.lerp(m, g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    bc1 = 1 - b1 ** t
    bc2_sqrt = (1 - b2 ** t) ** 0.5
    denom = _safe_sqrt(v) / bc2_sqrt + eps
    return p - (lr / bc1) * m / denom, {"step": t, "exp_avg": m, "exp_avg_sq": v}


def initial_states(optimizer: torch.optim.Optimizer, real: list[Tensor]) -> list[State]:
    """The optimizer's current state per parameter, detached (the start of an unrolled run)."""
    out = []
    for r in real:
        st = optimizer.state.get(r, {})
        s: State = {}
        for k, val in st.items():
            if k == "step":
                s["step"] = float(val)
            elif isinstance(val, Tensor):
                s[k] = val.detach().clone()
        out.append(s)
    return out


def write_back(optimizer: torch.optim.Optimizer, real: list[Tensor], states: list[State]) -> None:
    """Store detached states in the optimizer, in the layout torch.optim itself uses."""
    for r, s in zip(real, states):
        st = optimizer.state[r]
        for k, val in s.items():
            if k == "step":
                prev = st.get("step")
                dtype = prev.dtype if isinstance(prev, Tensor) else torch.float32
                device = prev.device if isinstance(prev, Tensor) else torch.device("cpu")
                st["step"] = torch.tensor(val, dtype=dtype, device=device)
            else:
                st[k] = val.detach().clone()


def clip_by_total_norm(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """``torch.nn.utils.clip_grad_norm_``'s rule, out of place and differentiable."""
    total = torch.sqrt(sum((g * g).sum() for g in grads))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef for g in grads]
