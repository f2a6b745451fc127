"""The experiment file's schema: known keys, types, defaults, and the checks that need no
imports of components and no data. Every error names the file, the key path and the value."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import did_you_mean
from .hypergrad import DEFAULT

if TYPE_CHECKING:
    from .config import Config

# key -> (type or tuple of types, default). ... means required.
TOP_KEYS = {"name", "description", "seed", "defaults", "data", "models", "problems",
            "dependencies", "hypergrad", "trainer", "tracking", "evaluation", "study"}
TRAINER_KEYS: dict[str, tuple[Any, Any]] = {
    "steps": (int, ...),
    "device": (str, "cpu"),
    "precision": (str, "auto"),
    "log_every": (int, 10),
    "eval_every": (int, 0),
    "checkpoint_every": (int, 0),
    "keep_checkpoints": (int, 3),
    "on_nonfinite": (str, "raise"),
    "deterministic": (bool, False),
    "threads": (int, 0),
    "loss_scale": (dict, None),   # fp16 only; absent unless given
    "check_hypergrad_every": (int, 0),
    "check_hypergrad_methods": (list, []),
}
# trainer.loss_scale: dynamic loss scaling under fp16 (torch.amp.GradScaler's defaults)
LOSS_SCALE_KEYS: dict[str, tuple[Any, Any]] = {
    "init": ((int, float), 65536.0),
    "growth_interval": (int, 2000),
    "growth": ((int, float), 2.0),
    "backoff": ((int, float), 0.5),
}
TRACKING_KEYS: dict[str, tuple[Any, Any]] = {
    "enabled": (bool, True),
    "uri": (str, "sqlite:///runs/mlflow.db"),
    "experiment": (str, None),
    "run_name": (str, None),
    "runs_dir": (str, "runs"),
}
PROBLEM_KEYS: dict[str, tuple[Any, Any]] = {
    "target": (str, ...),
    "module": (str, None),
    "data": (str, None),
    "optimizer": (dict, None),
    "scheduler": (dict, None),
    "steps": (int, 1),
    "grad_clip": ((int, float), None),
    "reads": (list, []),
    "batch_size": (int, None),
    "fused_attention": ((bool, str), "auto"),
    "args": (dict, {}),
}
DEPENDENCY_KEYS: dict[str, tuple[Any, Any]] = {
    "upper": (str, ...),
    "lower": (str, ...),
    "hypergrad": (dict, None),
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            list: "a list", dict: "a mapping"}.get(t, getattr(t, "__name__", str(t)))


def check_section(cfg: Config, node: Any, schema: Mapping[str, tuple[Any, Any]], key: str,
                  extra_ok: bool = False) -> dict[str, Any]:
    """Fill defaults, reject unknown keys and wrong types; returns the section with defaults."""
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise cfg.error("must be a mapping", key=key, value=node)
    out = dict(node)
    for k in node:
        if k not in schema and not extra_ok:
            raise cfg.error("unknown key" + did_you_mean(k, schema), key=f"{key}.{k}",
                            hint="known keys: " + ", ".join(schema))
    for k, (typ, default) in schema.items():
        if k not in out or out[k] is None:
            if default is ...:
                raise cfg.error("required key is missing", key=f"{key}.{k}")
            out[k] = copy.deepcopy(default)
            continue
        v = out[k]
        ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
        if typ in (float, (int, float)) and isinstance(v, bool):
            ok = False
        if not ok:
            raise cfg.error(f"must be {_type_name(typ)}", key=f"{key}.{k}", value=v)
    return out


def validate(cfg: Config) -> None:
    """Check everything that can be checked without importing components or reading data."""
    d = cfg.data
    for k in d:
        if k not in TOP_KEYS:
            raise cfg.error("unknown top-level key" + did_you_mean(k, TOP_KEYS), key=k,
                            hint="known keys: " + ", ".join(sorted(TOP_KEYS)))
    if "name" not in d:
        d["name"] = Path(cfg.file).stem
    d.setdefault("seed", 0)
    if not isinstance(d["seed"], int) or isinstance(d["seed"], bool):
        raise cfg.error("must be an integer", key="seed", value=d["seed"])
    d["trainer"] = check_section(cfg, d.get("trainer"), TRAINER_KEYS, "trainer")
    tr = d["trainer"]
    for k in ("steps",):
        if tr[k] < 1:
            raise cfg.error("must be a positive integer", key=f"trainer.{k}", value=tr[k])
    for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "threads"):
        if tr[k] < 0:
            raise cfg.error("must be >= 0", key=f"trainer.{k}", value=tr[k])
    if tr["check_hypergrad_every"] < 0:
        raise cfg.error("must be >= 0 (outer steps between hypergradient checks; 0: none)",
                        key="trainer.check_hypergrad_every", value=tr["check_hypergrad_every"])
    _check_methods_list(cfg, tr["check_hypergrad_methods"], "trainer.check_hypergrad_methods")
    if tr["precision"] not in PRECISIONS:
        raise cfg.error("unknown precision" + did_you_mean(tr["precision"], PRECISIONS),
                        key="trainer.precision", value=tr["precision"],
                        hint="one of " + ", ".join(PRECISIONS))
    _validate_loss_scale(cfg, tr)
    if tr["on_nonfinite"] not in ("raise", "skip"):
        raise cfg.error("must be 'raise' or 'skip'", key="trainer.on_nonfinite",
                        value=tr["on_nonfinite"])
    if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", tr["device"]):
        raise cfg.error("must be cpu, cuda, cuda:N or auto", key="trainer.device", value=tr["device"])
    d["tracking"] = check_section(cfg, d.get("tracking"), TRACKING_KEYS, "tracking")
    if d["tracking"]["experiment"] is None:
        d["tracking"]["experiment"] = d["name"]

    _validate_hypergrad(cfg, d.get("hypergrad"), "hypergrad", top=True)
    d.setdefault("hypergrad", {"method": DEFAULT})

    models = d.get("models") or {}
    if not isinstance(models, dict):
        raise cfg.error("must be a mapping of model names to {target, ...}", key="models", value=models)
    for name, spec in models.items():
        if not isinstance(spec, dict) or "target" not in spec:
            raise cfg.error("each model needs a 'target' (a dotted path or file.py:Class)",
                            key=f"models.{name}", value=spec)
    d["models"] = models

    problems = d.get("problems")
    if not problems or not isinstance(problems, dict):
        raise cfg.error("at least one problem is required", key="problems",
                        value=problems if problems is not None else ...)
    for name, spec in list(problems.items()):
        key = f"problems.{name}"
        if not isinstance(spec, dict):
            raise cfg.error("must be a mapping", key=key, value=spec)
        known = dict(PROBLEM_KEYS)
        # problem-specific keyword arguments may sit beside the common keys; they are checked
        # against the problem class's signature when it is built
        extras = {k: v for k, v in spec.items() if k not in known}
        spec = check_section(cfg, {k: v for k, v in spec.items() if k in known}, known, key)
        spec["args"] = {**spec["args"], **extras}
        if spec["steps"] < 1:
            raise cfg.error("must be a positive integer", key=f"{key}.steps", value=spec["steps"])
        if spec["module"] is not None and spec["module"] not in models:
            raise cfg.error("names no declared model" + did_you_mean(spec["module"], models),
                            key=f"{key}.module", value=spec["module"],
                            hint="declared models: " + (", ".join(models) or "none"))
        for r in spec["reads"]:
            if r not in problems:
                raise cfg.error("names no declared problem" + did_you_mean(r, problems),
                                key=f"{key}.reads", value=r)
        if spec["fused_attention"] not in (True, False, "auto"):
            raise cfg.error("must be true, false or auto", key=f"{key}.fused_attention",
                            value=spec["fused_attention"])
        if spec["grad_clip"] is not None and spec["grad_clip"] <= 0:
            raise cfg.error("must be positive", key=f"{key}.grad_clip", value=spec["grad_clip"])
        if spec["optimizer"] is not None:
            opt = spec["optimizer"]
            if "name" not in opt:
                raise cfg.error("needs a 'name' (sgd, adam, adamw or a dotted path)",
                                key=f"{key}.optimizer", value=opt)
            lr = opt.get("lr", None)
            if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0):
                raise cfg.error("must be a non-negative number", key=f"{key}.optimizer.lr", value=lr)
        problems[name] = spec
    deps = d.get("dependencies") or []
    if not isinstance(deps, list):
        raise cfg.error("must be a list of {upper, lower}", key="dependencies", value=deps)
    for i, dep in enumerate(deps):
        key = f"dependencies[{i}]"
        dep = check_section(cfg, dep, DEPENDENCY_KEYS, key)
        for role in ("upper", "lower"):
            if dep[role] not in problems:
                raise cfg.error("names no declared problem" + did_you_mean(dep[role], problems),
                                key=f"{key}.{role}", value=dep[role])
        if dep["upper"] == dep["lower"]:
            raise cfg.error("a problem cannot depend on itself", key=key,
                            value=f"{dep['upper']} -> {dep['lower']}")
        if dep["hypergrad"] is not None:
            _validate_hypergrad(cfg, dep["hypergrad"], f"{key}.hypergrad")
        deps[i] = dep
    d["dependencies"] = deps
    _check_data_section(cfg)


def _check_methods_list(cfg: Config, methods: list, key: str) -> None:
    """Method names compared with the reference beside the configured ones."""
    from .hypergrad import METHODS
    for i, m in enumerate(methods):
        if m not in METHODS:
            raise cfg.error("unknown hypergradient method" + (did_you_mean(m, METHODS)
                            if isinstance(m, str) else ""), key=f"{key}[{i}]", value=m,
                            hint="known: " + ", ".join(METHODS))


def _validate_loss_scale(cfg: Config, tr: dict[str, Any]) -> None:
    """``trainer.loss_scale: {init, growth_interval, growth, backoff}``, read under fp16 only;
    defaults filled in when the block is given, the key left out when it is not (so the
    digest that ``--resume`` compares stays that of earlier runs)."""
    if tr.get("loss_scale") is None:
        tr.pop("loss_scale", None)
        return
    key = "trainer.loss_scale"
    ls = check_section(cfg, tr["loss_scale"], LOSS_SCALE_KEYS, key)
    for k in ("init", "growth", "backoff"):
        if ls[k] != ls[k] or ls[k] in (float("inf"), float("-inf")):
            raise cfg.error("must be a finite number", key=f"{key}.{k}", value=ls[k])
        ls[k] = float(ls[k])
    if ls["init"] < 1:
        raise cfg.error("must be >= 1 (the scale never goes below 1)", key=f"{key}.init",
                        value=ls["init"], hint="GradScaler's default is 65536 (2**16)")
    if ls["growth_interval"] < 1:
        raise cfg.error("must be a positive integer (clean steps before the scale grows)",
                        key=f"{key}.growth_interval", value=ls["growth_interval"])
    if not ls["growth"] > 1:
        raise cfg.error("must be > 1 (the factor the scale grows by)", key=f"{key}.growth",
                        value=ls["growth"])
    if not 0 < ls["backoff"] < 1:
        raise cfg.error("must be between 0 and 1, exclusive (the factor the scale shrinks by "
                        "after an overflow)", key=f"{key}.backoff", value=ls["backoff"])
    tr["loss_scale"] = ls


def _validate_hypergrad(cfg: Config, node: Any, key: str, top: bool = False) -> None:
    """``{method: cg, iters: 5}``: options beside ``method`` belong to that method; a block
    named after a method (``darts: {alpha: 0.02}``) sets that method's options wherever it is
    used, so sweeping ``hypergrad.method`` keeps every method's settings. Each is checked by
    constructing the method (its fields are its options)."""
    from .hypergrad import METHODS
    if node is None:
        return
    if not isinstance(node, dict):
        raise cfg.error("must be a mapping like {method: darts, alpha: 0.01}", key=key, value=node)
    method = node.get("method", DEFAULT if top else None)
    if method is not None and method not in METHODS:
        raise cfg.error("unknown hypergradient method" + did_you_mean(method, METHODS),
                        key=f"{key}.method", value=method, hint="known: " + ", ".join(METHODS))
    for k, v in node.items():
        if k in METHODS and not isinstance(v, dict):
            raise cfg.error(f"options of '{k}' must be a mapping", key=f"{key}.{k}", value=v)
        if k in METHODS:
            _construct(cfg, k, v, f"{key}.{k}")
    flat = {k: v for k, v in node.items() if k != "method" and k not in METHODS}
    if method is not None:
        _construct(cfg, method, flat, key)
        return
    # a dependency's options without a method apply to whichever method it ends up with
    for k, v in flat.items():
        owners = [m for m, cls in METHODS.items() if k in cls.options()]
        if not owners:
            allowed = {o for cls in METHODS.values() for o in cls.options()}
            raise cfg.error("not an option of any method" + did_you_mean(k, allowed | set(METHODS)),
                            key=f"{key}.{k}", value=v, hint="options: " + ", ".join(sorted(allowed)))
        for m in owners:
            _construct(cfg, m, {k: v}, key)


def _construct(cfg: Config, method: str, options: Mapping[str, Any], key: str) -> None:
    """Build ``method`` with ``options``; a bad option is a ConfigError at ``key.option``."""
    from .hypergrad import METHODS, OptionError, make
    try:
        make(method, options)
    except OptionError as e:
        if e.option is None:
            raise cfg.error(e.detail, key=key) from None   # not reached: names are checked first
        known = set(METHODS[method].options())
        hint = None
        if e.option not in known:
            detail = f"not an option of '{method}'" + did_you_mean(e.option, known | set(METHODS))
            hint = ("options: " + ", ".join(sorted(known))) if known else f"'{method}' takes no options"
        else:
            detail = e.detail
        raise cfg.error(detail, key=f"{key}.{e.option}", value=e.value, hint=hint) from None


def hypergrad_options(node: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """(method, its flat options, options per method) from a validated hypergrad mapping."""
    from .hypergrad import METHODS
    method = node.get("method", DEFAULT)
    flat = {k: v for k, v in node.items() if k != "method" and k not in METHODS}
    per = {m: dict(node.get(m) or {}) for m in METHODS}
    return method, flat, per


def _check_data_section(cfg: Config) -> None:
    data = cfg.data.get("data")
    if data is None:
        return
    if not isinstance(data, dict):
        raise cfg.error("must be a mapping", key="data", value=data)
    if "dataset" not in data:
        raise cfg.error("required key is missing", key="data.dataset")
    splits = data.get("splits") or {}
    if not isinstance(splits, dict):
        raise cfg.error("must be a mapping of role names to split specs", key="data.splits",
                        value=splits)
    for name, spec in cfg.data["problems"].items():
        if spec["data"] is not None and spec["data"] not in splits:
            raise cfg.error("names no split declared in data.splits" + did_you_mean(spec["data"], splits),
                            key=f"problems.{name}.data", value=spec["data"],
                            hint="declared splits: " + (", ".join(splits) or "none"))
    options = data.get("options")
    if options is not None and not isinstance(options, dict):
        raise cfg.error("must be a mapping of the dataset's options, e.g. {n: 1000, image_size: "
                        "224}", key="data.options", value=options)
    bs = data.get("batch_size", 128)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise cfg.error("must be a positive integer", key="data.batch_size", value=bs)
