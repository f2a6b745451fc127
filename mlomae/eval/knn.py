"""k-nearest-neighbour classification on frozen features (DINO's weighted k-NN).

Features are L2-normalised, so the dot product is the cosine similarity s. Each test item takes
its k most similar train items; with ``vote: weighted`` neighbour j adds exp(s_j / T) to its
class's score (DINO: k = 20, T = 0.07), with ``vote: majority`` it adds 1. The prediction is
the class with the highest score; ties go to the lower class index.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, *,
               k: int = 20, temperature: float = 0.07, vote: str = "weighted",
               chunk: int = 1024) -> Tensor:
    """Class scores [m, C] for test features [m, D] from train features [n, D], labels [n]."""
    if vote not in ("weighted", "majority"):
        raise ValueError(f"vote must be 'weighted' or 'majority', got {vote!r}")
    k = min(k, train_x.shape[0])
    bank = F.normalize(train_x.float(), dim=1)                        # [n, D]
    out = []
    for start in range(0, test_x.shape[0], chunk):   # [chunk, n] similarities at a time
        q = F.normalize(test_x[start:start + chunk].float(), dim=1)  # [b, D]
        sim, idx = (q @ bank.T).topk(k, dim=1)                        # [b, k]
        w = (sim / temperature).exp() if vote == "weighted" else torch.ones_like(sim)
        out.append(torch.zeros(q.shape[0], num_classes).scatter_add_(1, train_y[idx], w))
    return torch.cat(out)


def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int,
                **options: Any) -> Tensor:
    """Predicted labels [m]; argmax returns the first maximum, so ties go to the lower class."""
    return knn_scores(train_x, train_y, test_x, num_classes, **options).argmax(1)


def run(built, spec: Mapping[str, Any], features, label: str = "knn") -> float:
    xtr, ytr, xte, yte = features
    pred = knn_predict(xtr, ytr, xte, built.data.meta.num_classes, k=spec["k"],
                       temperature=spec["temperature"], vote=spec["vote"])
    return 100.0 * int((pred == yte).sum()) / max(1, yte.numel())
