"""Optimizers and learning-rate schedules from experiment-file mappings."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .components import check_kwargs, locate
from .config import Config
from .errors import ConfigError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("constant", "cosine", "linear")


def build_optimizer(module: nn.Module, spec: Mapping[str, Any], cfg: Config | None, key: str
                    ) -> torch.optim.Optimizer | None:
    """``{name: adamw, lr: 1e-3, weight_decay: 0.05, decay_bias_and_norm: false, ...}``.

    As in MAE, biases and other 1-D parameters (norms, tokens' scales) get no weight decay
    unless ``decay_bias_and_norm: true``.
    """
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        return None
    spec = dict(spec)
    name = spec.pop("name")
    decay_all = spec.pop("decay_bias_and_norm", False)
    cls = OPTIMIZERS.get(str(name).lower()) or locate(name, cfg, f"{key}.name")
    if "betas" in spec and isinstance(spec["betas"], list):
        spec["betas"] = tuple(spec["betas"])
    check_kwargs(cls, {"params": None, **spec}, cfg, key)
    wd = spec.get("weight_decay", 0.0)
    if wd and not decay_all:
        decay = [p for n, p in params if p.ndim > 1 and not n.endswith(("cls_token", "pos_embed", "mask_token"))]
        no_decay = [p for n, p in params if not (p.ndim > 1 and not n.endswith(("cls_token", "pos_embed", "mask_token")))]
        groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    else:
        groups = [{"params": [p for _, p in params]}]
    try:
        return cls(groups, **spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build optimizer: {e}", file=cfg.file if cfg else None, key=key) from None


def build_scheduler(optimizer: torch.optim.Optimizer | None, spec: Mapping[str, Any] | None,
                    total_steps: int, cfg: Config | None, key: str):
    """``{name: cosine, warmup: 0.05, min_lr_ratio: 0.0}``; warmup as a fraction of the
    problem's total steps or ``warmup_steps``. None: constant learning rate."""
    if optimizer is None or not spec:
        return None
    spec = dict(spec)
    name = spec.pop("name", "cosine")
    if name not in SCHEDULES:
        raise ConfigError("unknown schedule", file=cfg.file if cfg else None, key=f"{key}.name",
                          value=name, hint="one of " + ", ".join(SCHEDULES))
    warm = spec.pop("warmup_steps", None)
    frac = spec.pop("warmup", 0.0)
    floor = float(spec.pop("min_lr_ratio", 0.0))
    if spec:
        bad = next(iter(spec))
        raise ConfigError("unknown schedule option", file=cfg.file if cfg else None,
                          key=f"{key}.{bad}", value=spec[bad],
                          hint="options: name, warmup, warmup_steps, min_lr_ratio")
    warmup = int(warm) if warm is not None else int(round(float(frac) * total_steps))
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if name == "cosine" else 1 - t
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
