"""Toy problems for tests/test_hypercheck.py: a lower level that draws noise from torch's global
generator (so a check that moved the random stream would move the training), and an upper
level whose loss reads its own parameters (so its direct gradient is not zero)."""

from __future__ import annotations

import torch

from problems.toy import PenalizedRegression, ValidationLoss


class NoisyRegression(PenalizedRegression):
    """Inputs jittered by N(0, 0.1²) noise, drawn anew at every evaluation of the loss."""

    def loss(self, batch):
        x, y = batch
        return super().loss((x + 0.1 * torch.randn_like(x), y))


class DirectValidation(ValidationLoss):
    """Validation error plus a pull of the log-penalties towards 0: a direct gradient."""

    def loss(self, batch):
        loss, logs = super().loss(batch)
        return loss + 0.002 * (self.module() ** 2).sum(), logs
