"""Evaluation on the held-out test split: the only code that reads it.

``run_protocol(built, spec, run_dir, key)`` runs one entry of an experiment's ``evaluation``
list and returns named numbers for ``summary.json`` and MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError

PROTOCOLS: dict[str, Callable[..., dict[str, Any]]] = {}


def protocol(name: str):
    def deco(fn):
        PROTOCOLS[name] = fn
        return fn
    return deco


@protocol("problem")
def problem_protocol(built, spec: Mapping[str, Any], run_dir: Path, key: str) -> dict[str, Any]:
    """``{protocol: problem, problem: NAME, split: test}``: the problem's own ``evaluate``."""
    name = spec.get("problem")
    if name not in built.problems:
        raise ConfigError("names no declared problem", file=built.cfg.file, key=f"{key}.problem",
                          value=name)
    p = built.problems[name]
    if not callable(getattr(p, "evaluate", None)):
        raise ConfigError(f"{type(p).__name__} has no evaluate() method", file=built.cfg.file,
                          key=f"{key}.problem", value=name)
    split = spec.get("split", "test")
    loader = built.data.loader(split, spec.get("batch_size"), augment=False, shuffle=False,
                               drop_last=False, device=built.device)
    return dict(p.evaluate(loader.iter_epoch()))


def run_protocol(built, spec: Mapping[str, Any], run_dir: Path, key: str) -> dict[str, Any]:
    if not isinstance(spec, Mapping) or "protocol" not in spec:
        raise ConfigError("each evaluation needs a 'protocol'", file=built.cfg.file, key=key,
                          value=spec)
    name = spec["protocol"]
    if name not in PROTOCOLS:
        raise ConfigError("unknown evaluation protocol", file=built.cfg.file, key=f"{key}.protocol",
                          value=name, hint="known: " + ", ".join(sorted(PROTOCOLS)))
    return PROTOCOLS[name](built, spec, run_dir, key)
