"""Tiny modules for image-free examples and engine tests (hyperparameter and data-weight
learning on small problems)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LogPenalty", "SampleWeights", "MLP"]


class LogPenalty(nn.Module):
    """A learnable vector log(lambda) [dim], e.g. per-feature L2 penalties; ``forward()`` returns
    it. Log scale keeps lambda = exp(.) positive without a constraint."""

    def __init__(self, dim: int, init: float = 0.0):
        super().__init__()
        self.log_lam = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self) -> Tensor:
        return self.log_lam


class SampleWeights(nn.Module):
    """Per-sample logits [n] (data reweighting); ``forward(indices)`` picks a batch's entries."""

    def __init__(self, n: int, init: float = 0.0):
        super().__init__()
        self.logits = nn.Parameter(torch.full((n,), float(init)))

    def forward(self, indices: Tensor | None = None) -> Tensor:
        return self.logits if indices is None else self.logits[indices]


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden``; ``depth = 0`` is a linear model.

    Tanh by default: it is smooth, so second-order hypergradients see curvature that ReLU's zero
    second derivative would hide.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int = 1,
                 act: str = "tanh"):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[act]()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """[N, in_features] -> [N, out_features]."""
        return self.net(x)
