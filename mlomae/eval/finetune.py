"""Full fine-tuning: a copy of the encoder plus a linear head, trained end to end.

AdamW with MAE's recipe in small: layer-wise learning-rate decay (timm/BEiT style: the
embeddings are layer 0, ``blocks.i`` layer i + 1, everything after the last block, the head
included, layer depth + 1; a parameter of layer l gets lr * layer_decay ** (depth + 1 - l)), no
weight decay on biases, norms and tokens, linear warmup then a cosine to zero (per batch), label
smoothing, and the training split's augmentation. The run's own model is never changed.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.attention import set_fused_attention
from .features import batch_size_of, features_of, loader_for, role_items

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = ("cls_token", "pos_embed", "reg_token", "dist_token", "patch_embed", "mask_token")
_NO_DECAY = ("cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")


class FeatureClassifier(nn.Module):
    """``head(encoder.features(imgs, pool))``."""

    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)   # MAE's fine-tune head init
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.head(features_of(self.encoder, imgs, self.pool))


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings and tokens, i + 1 for ``blocks.i``, depth + 1 for the rest."""
    if name.startswith(_EMBED):
        return 0
    m = _BLOCK.match(name)
    return int(m.group(1)) + 1 if m else depth + 1


def encoder_depth(names: Iterable[str]) -> int:
    ids = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    return max(ids) + 1 if ids else 0


def param_groups(model: FeatureClassifier, weight_decay: float, layer_decay: float
                 ) -> list[dict[str, Any]]:
    """AdamW groups keyed by (layer, decay?), each with its ``lr_scale``."""
    named = [(n, p) for n, p in model.encoder.named_parameters() if p.requires_grad]
    depth = encoder_depth(n for n, _ in named)
    named += [(f"head.{n}", p) for n, p in model.head.named_parameters()]
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for n, p in named:
        lid = depth + 1 if n.startswith("head.") else layer_id(n, depth)
        decay = p.ndim > 1 and not n.endswith(_NO_DECAY)
        g = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid})
        g["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then a half cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    """Top-1 in percent."""
    correct, n = 0, 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        n += y.numel()
    return 100.0 * correct / max(n, 1)


def _train(built, spec: Mapping[str, Any], model: nn.Module, items, train,
           label: str = "finetune") -> FeatureClassifier:
    from ..progress import ProgressLine
    encoder = copy.deepcopy(model).eval()
    set_fused_attention(encoder, True)   # first-order training: the fused kernel is allowed
    with torch.no_grad():   # the feature width, from one image
        x0, _ = next(iter(loader_for(built, spec["train"], items[:1], 1)))
        dim = features_of(encoder, x0, spec["pool"]).shape[1]
    clf = FeatureClassifier(encoder, dim, built.data.meta.num_classes, spec["pool"]).to(built.device)
    groups = param_groups(clf, spec["weight_decay"], spec["layer_decay"])
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.999))
    total = spec["epochs"] * len(train)
    warmup = int(round(spec["warmup_epochs"] * len(train)))
    step = 0
    bar = ProgressLine(f"{label}: training", total, "steps")
    for _ in range(spec["epochs"]):
        clf.train()
        for x, y in train.iter_epoch():
            bar.update()
            f = lr_factor(step, total, warmup)
            for g in opt.param_groups:
                g["lr"] = spec["lr"] * f * g["lr_scale"]
            loss = F.cross_entropy(clf(x), y, label_smoothing=spec["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    bar.close()
    return clf


def run(built, spec: Mapping[str, Any], model: nn.Module, label: str = "finetune") -> float:
    """Fine-tune a copy of ``model`` on the train role's (labelled share of) items; test top-1."""
    seed = built.cfg["seed"] if spec["seed"] is None else spec["seed"]
    bs = int(spec.get("batch_size") or built.data.section.get("batch_size", 128))
    items = role_items(built, spec["train"], spec["labels"])
    train = loader_for(built, spec["train"], items, bs, augment=spec["augment"], shuffle=True,
                       seed=seed, drop_last=True)
    test = loader_for(built, spec["test"], role_items(built, spec["test"]),
                      batch_size_of(built, spec))
    # the seed fixes the head's init and any dropout; the caller's random stream is left alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = _train(built, spec, model, items, train, label)
    clf.eval()
    return accuracy(clf, test.iter_epoch())
