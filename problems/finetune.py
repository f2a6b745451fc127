"""The fine-tune level: a classification head on the features of the pretrained encoder.

Only the head is this problem's module, so only the head is optimised; the encoder is read from
the pretraining problem through the engine. The loss still depends on the encoder's parameters,
which is the path MLO-MAE's hypergradient takes from the head back to the MAE (and the masker).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from mlomae.engine import Problem

from .pretrain import split_batch

POOLS = ("cls", "mean")


class Classification(Problem):
    """Cross-entropy of ``head(encoder.features(x, pool))`` on labeled data.

    YAML options: ``encoder`` (the problem whose module is the MAE, default ``pretrain``; must be
    in ``reads``), ``pool`` (``mean`` of the patch tokens or the ``cls`` token, default mean),
    ``label_smoothing`` (0).
    """

    # the head sits on top of the encoder's features: second derivatives in the head's
    # parameters, and their mixed derivatives in the encoder's, differentiate the encoder once,
    # so its attention may stay fused whatever method pushes through this problem
    first_order_reads = True

    def __init__(self, *args, encoder: str = "pretrain", pool: str = "mean",
                 label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if pool not in POOLS:
            raise ValueError(f"pool must be cls or mean (got {pool!r})")
        if encoder not in self.reads:
            raise ValueError(f"the head reads the encoder of problem '{encoder}': add it to "
                             f"problems.{self.name}.reads")
        self.encoder, self.pool, self.label_smoothing = encoder, pool, float(label_smoothing)

    def features(self, imgs: Tensor) -> Tensor:
        """Pooled encoder features [N, D] of unmasked images."""
        return self.read(self.encoder).features(imgs, self.pool)

    def logits(self, imgs: Tensor) -> Tensor:
        return self.module(self.features(imgs))                   # [N, classes]

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        imgs, labels, _ = split_batch(batch)
        logits = self.logits(imgs)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {"top1": (logits.argmax(1) == labels).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable) -> dict[str, float]:
        """Top-1 accuracy (percent) and cross-entropy of the head on ``batches``: for the
        ``problem`` evaluation protocol, nothing else. The keys are named for the test split;
        the protocol renames them when it evaluates another one (``mask_top1``)."""
        head, was_training = self.module, self.module.training
        head.eval()   # BatchNorm heads: running statistics, and no update from test data
        correct, total, loss = 0, 0, 0.0
        try:
            for batch in batches:
                imgs, labels, _ = split_batch(batch)
                logits = self.logits(imgs)
                loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                total += labels.numel()
        finally:
            head.train(was_training)
        n = max(total, 1)
        return {"test_top1": 100.0 * correct / n, "test_loss": loss / n, "test_count": total}
