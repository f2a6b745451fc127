"""Image-free problems: learning per-feature L2 penalties for a regression by the validation
loss (hyperparameter optimisation as a bilevel program). Runs the whole engine in seconds."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from mlomae.engine import Problem


class PenalizedRegression(Problem):
    """Lower level: mean squared error + Σ_j e^{λ_j} w_j² / 2, with λ read from ``penalty``."""

    def __init__(self, *args, penalty: str = "hyper", **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def loss(self, batch) -> Tensor:
        x, y = batch
        pred = self.module(x).squeeze(-1)
        w = self.module.weight.squeeze(0)  # a torch.nn.Linear with one output
        lam = self.read(self.penalty)().exp()
        mse = ((pred - y) ** 2).mean()
        return mse + 0.5 * (lam * w ** 2).sum(), {"mse": mse.detach()}


class ValidationLoss(Problem):
    """Upper level: the lower model's mean squared error on held-out data."""

    def __init__(self, *args, model: str = "regression", **kwargs):
        super().__init__(*args, **kwargs)
        self.model = model

    def loss(self, batch) -> Tensor:
        x, y = batch
        pred = self.read(self.model)(x).squeeze(-1)
        return ((pred - y) ** 2).mean(), {"mean_log_lambda": self.module().mean().detach()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Test mean squared error of the lower model (final evaluation only)."""
        total, n = 0.0, 0
        for x, y in batches:
            pred = self.read(self.model)(x).squeeze(-1)
            total += float(((pred - y) ** 2).sum())
            n += y.numel()
        return {"test_mse": total / max(n, 1)}
