"""What every protocol shares: which model, which items, and frozen features of them.

Items: the ``train`` role's indices, cut to a class-balanced share with ``labels`` (the first
max(1, round(f * n_c)) items of every class c in the role's order, which for a slice such as
``train[:80%]`` is the seeded permutation: ``labels: 10%`` on it selects exactly the items of
the split spec ``train[:80%]@balanced:10%``). The ``test`` role is read whole.
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..data import dataset_labels, make_loader
from ..errors import ConfigError
from ..models.attention import fused_attention
from .spec import PIXELS, Labels


def has_features(m: Any) -> bool:
    return callable(getattr(m, "features", None))


def default_model(built) -> str | None:
    """The first model (in the experiment's order) with ``features(imgs, pool)``."""
    return next((n for n, m in built.models.items() if has_features(m)), None)


def resolve_model(built, name: str | None, *, key: str) -> tuple[str, nn.Module | None]:
    """(name, module); ``pixels`` gives (``pixels``, None)."""
    if name == PIXELS:
        return PIXELS, None
    if name is None:
        name = default_model(built)
        if name is None:
            raise ConfigError("no model has features(imgs, pool): nothing to evaluate",
                              file=built.cfg.file, key=f"{key}.model",
                              hint=f"models: {', '.join(built.models) or 'none'}; "
                                   f"'model: {PIXELS}' probes raw pixels")
    if name not in built.models:
        raise ConfigError("names no declared model", file=built.cfg.file, key=f"{key}.model",
                          value=name, hint=f"models: {', '.join(built.models)} (or '{PIXELS}')")
    m = built.models[name]
    if not has_features(m):
        raise ConfigError(f"{type(m).__name__} has no features(imgs, pool)",
                          file=built.cfg.file, key=f"{key}.model", value=name)
    return name, m


def check_roles(built, spec: Mapping[str, Any], *, key: str) -> None:
    data = built.data
    if data is None:
        raise ConfigError("evaluation needs a data section", file=built.cfg.file, key=key)
    if data.meta.task != "classification" or not data.meta.num_classes:
        raise ConfigError(f"dataset '{data.meta.name}' has no class labels to evaluate with",
                          file=built.cfg.file, key=key)
    for field in ("train", "test"):
        role = spec[field]
        if role not in data.indices:
            raise ConfigError("names no role of data.splits", file=built.cfg.file,
                              key=f"{key}.{field}", value=role,
                              hint="roles: " + ", ".join(data.indices))
    if data.source(spec["train"]) == "test":
        raise ConfigError("trains on the test split; hold out part of train instead",
                          file=built.cfg.file, key=f"{key}.train", value=spec["train"])


def balanced_subset(indices: np.ndarray, labels: np.ndarray, labels_share: Labels) -> np.ndarray:
    """Per class c with n_c items among ``indices``: its first max(1, floor(f n_c + 1/2)), in
    the order of ``indices`` (the rule of the split spec ``@balanced:f``)."""
    if labels_share.fraction == 1:
        return indices
    lab = labels[indices]
    keep = np.zeros(indices.size, dtype=bool)
    for c in np.unique(lab):
        members = np.flatnonzero(lab == c)
        k = max(1, math.floor(labels_share.fraction * members.size + Fraction(1, 2)))
        keep[members[:k]] = True
    return indices[keep]


def role_items(built, role: str, labels_share: Labels | None = None) -> np.ndarray:
    idx = np.asarray(built.data.indices[role])
    if labels_share is None or labels_share.fraction == 1:
        return idx
    labels = dataset_labels(built.data.datasets[built.data.source(role)])
    return balanced_subset(idx, labels, labels_share)


def batch_size_of(built, spec: Mapping[str, Any]) -> int:
    s = built.data.section
    return int(spec.get("batch_size") or s.get("eval_batch_size") or 256)


def loader_for(built, role: str, items: np.ndarray, batch_size: int, *, augment: bool = False,
               shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    data = built.data
    return make_loader(data.datasets[data.source(role)], items, batch_size, shuffle=shuffle,
                       seed=seed, drop_last=drop_last and items.size >= batch_size,
                       num_workers=data.section.get("num_workers", 0),
                       transform=data.transform(augment), device=built.device)


def features_of(model: nn.Module | None, imgs: Tensor, pool: str) -> Tensor:
    """[N, C, H, W] -> [N, D]: the model's pooled features, or flattened pixels (model None)."""
    if model is None:
        return imgs.flatten(1)
    fn = model.features
    try:
        takes_pool = "pool" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_pool = False
    out = fn(imgs, pool=pool) if takes_pool else fn(imgs)
    if out.ndim != 2:
        raise ConfigError(f"{type(model).__name__}.features returned shape "
                          f"{tuple(out.shape)}; a probe needs pooled features [N, D]")
    return out


@torch.no_grad()
def extract(built, model: nn.Module | None, role: str, items: np.ndarray, pool: str,
            batch_size: int, label: str = "features") -> tuple[Tensor, Tensor]:
    """Frozen features [n, D] (float32, CPU) and labels [n] of ``items`` of ``role``, eval
    transform, no augmentation; the model is in eval mode meanwhile. A progress line (``label``)
    when it takes more than a few seconds."""
    from ..progress import ProgressLine
    was = model.training if model is not None else False
    if model is not None:
        model.eval()
    feats, labels = [], []
    loader = loader_for(built, role, items, batch_size)
    try:
        with fused_attention(model if model is not None else nn.Module(), True), \
                ProgressLine(f"{label} of {role}", len(loader), "batches") as bar:
            for x, y in loader.iter_epoch():
                feats.append(features_of(model, x, pool).float().cpu())
                labels.append(y.cpu())
                bar.update()
    finally:
        if model is not None:
            model.train(was)
    return torch.cat(feats), torch.cat(labels).long()
