"""Linear probe: a softmax classifier on frozen, standardised features.

The features are extracted once; the classifier is then fitted full-batch with L-BFGS on the
convex objective ``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not penalised), from
zero weights: no learning rate or epochs to tune, and the same answer every time. Standardising
with the train statistics is MAE's BatchNorm-without-affine before the probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LinearClassifier:
    weight: Tensor   # [D, C]
    bias: Tensor     # [C]
    mean: Tensor     # [D] train feature mean (0 without standardising)
    std: Tensor      # [D] train feature std (1 without standardising)

    def logits(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias


CHUNK = 10   # L-BFGS iterations between two checks of the stopping rule


def fit_linear(x: Tensor, y: Tensor, num_classes: int, *, weight_decay: float = 1e-4,
               max_iter: int = 500, tol: float = 0.0, standardize: bool = True,
               label: str | None = None) -> LinearClassifier:
    """Fit on features x [n, D] with labels y [n] in 0..num_classes-1 (a progress line named
    ``label`` when the fit takes more than a few seconds).

    Stops after ``max_iter`` L-BFGS iterations, at L-BFGS's own convergence tests, or, with
    ``tol`` > 0, once the objective's relative decrease over ``CHUNK`` iterations falls below
    ``tol`` (the optimizer's memory is kept across those chunks)."""
    from ..progress import ProgressLine
    x = x.float()
    if standardize:
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    z = (x - mean) / std                                             # [n, D]
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    chunk = min(CHUNK, max_iter) if tol > 0 else max_iter
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=chunk, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    bar = ProgressLine(f"{label or 'linear'}: L-BFGS", max_iter, "iterations")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        bar.done = min(bar.total - 1, opt.state[w].get("n_iter", 0)) if opt.state.get(w) else 0
        bar.update(1)
        return loss

    with torch.enable_grad(), bar:
        before, done = None, 0
        while done < max_iter:
            opt.param_groups[0]["max_iter"] = min(chunk, max_iter - done)
            loss = float(opt.step(closure).detach())
            n = opt.state[w]["n_iter"]
            if tol <= 0 or n == done or (before is not None
                                         and (before - loss) / max(abs(loss), 1e-12) < tol):
                break   # one plain fit; converged inside the chunk; too little progress over it
            before, done = loss, n
    return LinearClassifier(w.detach(), b.detach(), mean, std)


def top1(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent (as the problems' own evaluations report it)."""
    return 100.0 * int((logits.argmax(1) == y).sum()) / max(1, y.numel())


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 num_classes: int, **options: Any) -> float:
    """Top-1 (percent) on the test features of a linear classifier fitted on the train features."""
    clf = fit_linear(train_x, train_y, num_classes, **options)
    return top1(clf.logits(test_x.float()), test_y)


def run(built, spec: Mapping[str, Any], features, label: str = "linear") -> float:
    """The ``linear`` protocol on features already extracted: ``features = (xtr, ytr, xte, yte)``."""
    xtr, ytr, xte, yte = features
    return linear_probe(xtr, ytr, xte, yte, built.data.meta.num_classes,
                        weight_decay=spec["weight_decay"], max_iter=spec["max_iter"],
                        tol=spec["tol"], standardize=spec["standardize"], label=label)
