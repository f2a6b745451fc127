"""Evaluation on the held-out test split: the only code that reads it.

``run_protocol(built, spec, run_dir, key)`` runs one entry of an experiment's ``evaluation``
list and returns named numbers for ``summary.json`` and MLflow. Protocols:

- ``linear``: softmax classifier on frozen, standardised features (L-BFGS)   -> ``linear_top1``
- ``knn``: weighted k-NN on L2-normalised frozen features (DINO)             -> ``knn_top1``
- ``finetune``: a copy of the encoder plus a head, trained end to end        -> ``finetune_top1``
- ``problem``: a problem's own ``evaluate`` on a split

Top-1 is reported in percent (0-100), as the problems' own evaluations do. ``spec.py`` lists
every key with its default; ``labels: 10%`` trains on a class-balanced tenth
of the train role (``linear_top1_10pct``), ``model: pixels`` probes raw pixels, the floor.
Nothing here selects anything by the test split: it is read once, after training, to report.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import ConfigError
from .spec import PIXELS, check_spec, result_name, unique_name

PROTOCOLS: dict[str, Callable[..., dict[str, Any]]] = {}


def protocol(name: str):
    def deco(fn):
        PROTOCOLS[name] = fn
        return fn
    return deco


@protocol("problem")
def problem_protocol(built, spec: Mapping[str, Any], run_dir: Path, key: str) -> dict[str, Any]:
    """``{protocol: problem, problem: NAME, split: test}``: the problem's own ``evaluate``, on
    ``split`` (test by default; its metrics are named after the split)."""
    name = spec.get("problem")
    if name not in built.problems:
        raise ConfigError("names no declared problem", file=built.cfg.file, key=f"{key}.problem",
                          value=name)
    p = built.problems[name]
    if not callable(getattr(p, "evaluate", None)):
        raise ConfigError(f"{type(p).__name__} has no evaluate() method", file=built.cfg.file,
                          key=f"{key}.problem", value=name)
    from .features import loader_for, role_items
    split = spec.get("split", "test")
    if split not in built.data.indices:
        raise ConfigError("names no role of data.splits", file=built.cfg.file, key=f"{key}.split",
                          value=split, hint="roles: " + ", ".join(built.data.indices))
    # the whole split on every process (built.data.loader would give each rank its shard only)
    bs = spec.get("batch_size") or built.data.section.get("batch_size", 128)
    loader = loader_for(built, split, role_items(built, split), bs)
    out = dict(p.evaluate(loader.iter_epoch()))
    # evaluate() names its metrics for the test split; on another split they carry that name
    # (split: mask gives mask_top1, a validation number settings may be chosen on)
    if split != "test":
        out = {f"{split}_{k[5:]}" if k.startswith("test_") else k: v for k, v in out.items()}
    return out


# -- protocols on the encoder's features ----------------------------------------------------

def _fingerprint(model) -> float:
    """Changes whenever the weights do: cached features are only reused for the same weights."""
    if model is None:
        return 0.0
    with torch.no_grad():
        return float(sum(t.double().sum() for t in model.state_dict().values()
                         if torch.is_tensor(t) and t.is_floating_point()))


def role_features(built, name: str, model, role: str, pool: str, batch_size: int,
                  items: np.ndarray, label: str = "features"):
    """Features and labels of ``items`` of ``role``. Extractions are kept in ``built.context``
    for the same weights: a label fraction is sliced out of the whole role when that is there."""
    from .features import extract, role_items
    cache = built.context.setdefault("eval_features", {})
    fp = _fingerprint(model)

    def key_of(idx: np.ndarray) -> tuple:
        return (name, pool, role, fp, hashlib.sha1(np.ascontiguousarray(idx).tobytes()).hexdigest())

    if key_of(items) in cache:
        return cache[key_of(items)]
    full = role_items(built, role)
    if key_of(full) in cache:
        x, y = cache[key_of(full)]
        pos = torch.from_numpy(np.flatnonzero(np.isin(full, items)))
        return x[pos], y[pos]
    cache[key_of(items)] = extract(built, model, role, items, pool, batch_size, label)
    return cache[key_of(items)]


def _name(built, spec: Mapping[str, Any], key: str) -> str:
    """The result's name: its unique name in the run's evaluation list when ``key`` points at
    this very spec there, else its own name (an evaluation added after the run, e.g. by a
    study, may come with a key whose index holds another spec in the run's list)."""
    from .features import default_model
    dm = default_model(built)
    m = re.fullmatch(r"evaluation\[(\d+)\]", key)
    specs = built.cfg.get("evaluation") or []
    if m and int(m.group(1)) < len(specs):
        listed = specs[int(m.group(1))]
        if isinstance(listed, Mapping) and _same_spec(listed, spec):
            return unique_name(list(specs), int(m.group(1)), dm, file=built.cfg.file)
    return result_name(spec, dm)


def _same_spec(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two evaluation specs ask for the same thing: equal once ``check_spec`` has filled
    in the defaults, names aside, and not named differently."""
    def checked(s):
        try:
            return {k: v for k, v in check_spec(dict(s)).items() if k != "name"}
        except ConfigError:
            return {k: v for k, v in s.items() if k != "name"}
    named = a.get("name") and b.get("name")
    return checked(a) == checked(b) and (not named or a["name"] == b["name"])


def _say(key: str, name: str, value: float, t0: float) -> None:
    print(f"{key}: {name} = {value:.2f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
          flush=True)


def _frozen(kind: str):
    def run(built, spec: Mapping[str, Any], run_dir: Path, key: str) -> dict[str, Any]:
        from . import knn, linear
        from .features import batch_size_of, check_roles, resolve_model, role_items
        t0 = time.perf_counter()
        spec = check_spec(spec, file=built.cfg.file, key=key)
        check_roles(built, spec, key=key)
        name, model = resolve_model(built, spec["model"], key=key)
        bs = batch_size_of(built, spec)
        label = f"{key} {kind}: {name} features"
        tr = role_features(built, name, model, spec["train"], spec["pool"], bs,
                           role_items(built, spec["train"], spec["labels"]), label)
        te = role_features(built, name, model, spec["test"], spec["pool"], bs,
                           role_items(built, spec["test"]), label)
        top1 = {"linear": linear, "knn": knn}[kind].run(built, spec, (*tr, *te), label=f"{key} {kind}")
        out_name = _name(built, spec, key)
        _say(key, out_name, top1, t0)
        return {out_name: top1}
    run.__doc__ = f"``{{protocol: {kind}, ...}}`` on frozen features (keys: see spec.py)."
    return run


PROTOCOLS["linear"] = _frozen("linear")
PROTOCOLS["knn"] = _frozen("knn")


@protocol("finetune")
def finetune_protocol(built, spec: Mapping[str, Any], run_dir: Path, key: str) -> dict[str, Any]:
    """``{protocol: finetune, epochs, lr, layer_decay, ...}``: end to end on the train role."""
    from . import finetune
    from .features import check_roles, resolve_model
    t0 = time.perf_counter()
    spec = check_spec(spec, file=built.cfg.file, key=key)
    check_roles(built, spec, key=key)
    name, model = resolve_model(built, spec["model"], key=key)
    if model is None:
        raise ConfigError(f"fine-tuning needs a model with weights, not '{PIXELS}'",
                          file=built.cfg.file, key=f"{key}.model", value=name)
    top1 = finetune.run(built, spec, model, label=f"{key} finetune")
    out_name = _name(built, spec, key)
    _say(key, out_name, top1, t0)
    return {out_name: top1}


def run_protocol(built, spec: Mapping[str, Any], run_dir: Path, key: str) -> dict[str, Any]:
    if not isinstance(spec, Mapping) or "protocol" not in spec:
        raise ConfigError("each evaluation needs a 'protocol'", file=built.cfg.file, key=key,
                          value=spec)
    name = spec["protocol"]
    if name not in PROTOCOLS:
        raise ConfigError("unknown evaluation protocol", file=built.cfg.file, key=f"{key}.protocol",
                          value=name, hint="known: " + ", ".join(sorted(PROTOCOLS)))
    return PROTOCOLS[name](built, spec, run_dir, key)


def check_evaluation(cfg) -> None:
    """Check every entry of ``cfg['evaluation']`` without building anything (for ``validate``
    and the start of a run, so that a typo fails before training, not after)."""
    specs = cfg.get("evaluation") or []
    if not isinstance(specs, list):
        raise ConfigError("must be a list of {protocol: ...}", file=cfg.file, key="evaluation",
                          value=specs)
    for i, spec in enumerate(specs):
        key = f"evaluation[{i}]"
        if not isinstance(spec, Mapping) or "protocol" not in spec:
            raise ConfigError("each evaluation needs a 'protocol'", file=cfg.file, key=key,
                              value=spec)
        if spec["protocol"] not in PROTOCOLS:
            raise ConfigError("unknown evaluation protocol", file=cfg.file, key=f"{key}.protocol",
                              value=spec["protocol"], hint="known: " + ", ".join(sorted(PROTOCOLS)))
        if spec["protocol"] != "problem":
            check_spec(spec, file=cfg.file, key=key)
