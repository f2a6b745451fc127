"""Experiment files: YAML -> one validated, resolved dict, and components by path.

What happens to a file, in order:
1. ``defaults:`` fragments are merged first (a string merges at the root, ``{key.path: file}``
   mounts a fragment at a key), then the file itself on top. Fragment paths are looked up next
   to the including file, then in the current directory, then in the project root.
2. Command-line overrides ``key.sub=value`` (values parsed as YAML) replace existing keys;
   ``+key.sub=value`` adds a new one.
3. ``${env:NAME}`` / ``${env:NAME,default}`` in strings are replaced from the environment and
   a leading ``~`` in paths is expanded.
4. The schema below is checked; every error names the file, the key path and the value.

Components are named by dotted path (``mlomae.models.mae.MaskedAutoencoder``) or by file path
(``my_problems.py:MyProblem``, relative to the experiment file); their keyword arguments are
checked against the constructor's signature before anything is built.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# key -> (type or tuple of types, default). ... means required.
TOP_KEYS = {"name", "description", "seed", "defaults", "data", "models", "problems",
            "dependencies", "hypergrad", "trainer", "tracking", "evaluation", "study"}
TRAINER_KEYS: dict[str, tuple[Any, Any]] = {
    "steps": (int, ...),
    "device": (str, "cpu"),
    "precision": (str, "fp32"),
    "log_every": (int, 10),
    "eval_every": (int, 0),
    "checkpoint_every": (int, 0),
    "keep_checkpoints": (int, 3),
    "on_nonfinite": (str, "raise"),
    "deterministic": (bool, False),
    "threads": (int, 0),
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
    "args": (dict, {}),
}
DEPENDENCY_KEYS: dict[str, tuple[Any, Any]] = {
    "upper": (str, ...),
    "lower": (str, ...),
    "hypergrad": (dict, None),
}
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Config:
    """A resolved experiment: ``data`` is the plain dict, ``file`` where it came from."""

    data: dict[str, Any]
    file: str
    overrides: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def error(self, message: str, key: str | None = None, value: Any = ..., hint: str | None = None
              ) -> ConfigError:
        return ConfigError(message, file=self.file, key=key, value=value, hint=hint)

    @property
    def base_dir(self) -> Path:
        return Path(self.file).resolve().parent

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


# -- loading -------------------------------------------------------------------------------

def _read_yaml(path: Path, key: str | None = None) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path), key=key) from None
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror}", file=str(path), key=key) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error{where}: {problem}", file=str(path)) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError("an experiment file must be a mapping of keys to values",
                          file=str(path), value=type(doc).__name__)
    return doc


def _find_fragment(name: str, including: Path) -> Path:
    p = Path(os.path.expanduser(name))
    candidates = [p] if p.is_absolute() else [including.parent / p, Path.cwd() / p, PROJECT_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"fragment '{name}' not found (looked in: "
                      + ", ".join(str(c) for c in candidates) + ")",
                      file=str(including), key="defaults")


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``top`` replaces."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError("fragments include each other in a loop: "
                          + " -> ".join(str(s) for s in seen + (path,)), file=str(path), key="defaults")
    doc = _read_yaml(path)
    defaults = doc.pop("defaults", None) or []
    if not isinstance(defaults, list):
        raise ConfigError("must be a list of fragment files", file=str(path), key="defaults",
                          value=defaults)
    base: dict[str, Any] = {}
    for i, item in enumerate(defaults):
        if isinstance(item, str):
            base = merge(base, _load_tree(_find_fragment(item, path), seen + (path,)))
        elif isinstance(item, dict) and len(item) == 1:
            (mount, name), = item.items()
            frag = _load_tree(_find_fragment(str(name), path), seen + (path,))
            base = merge(base, _nest(str(mount), frag))
        else:
            raise ConfigError("each entry is a fragment path or {key.path: fragment}",
                              file=str(path), key=f"defaults[{i}]", value=item)
    return merge(base, doc)


def _nest(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def apply_override(data: dict[str, Any], item: str, file: str) -> None:
    if "=" not in item:
        raise ConfigError("an override has the form key.path=value", file=file, key="overrides",
                          value=item)
    key, _, raw = item.partition("=")
    key = key.strip()
    add = key.startswith("+")
    key = key.lstrip("+")
    add = add or _schema_key(key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError("cannot set a key inside a non-mapping value", file=file,
                              key=".".join(parts[:i]), value=node)
        if part not in node:
            if not add:
                raise ConfigError("no such key to override" + _did_you_mean(part, node),
                                  file=file, key=".".join(parts[:i + 1]),
                                  hint="prefix the override with + to add a new key")
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError("cannot set a key inside a non-mapping value", file=file,
                          key=".".join(parts[:-1]), value=node)
    if parts[-1] not in node and not add:
        raise ConfigError("no such key to override" + _did_you_mean(parts[-1], node), file=file,
                          key=key, hint="prefix the override with + to add a new key")
    node[parts[-1]] = value


def _schema_key(key: str) -> bool:
    """Keys the schema knows may be set by an override even where the file leaves them out."""
    from .hypergrad import METHODS, OPTIONS
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0] in TOP_KEYS
    sections = {"trainer": TRAINER_KEYS, "tracking": TRACKING_KEYS}
    if len(parts) == 2 and parts[0] in sections:
        return parts[1] in sections[parts[0]]
    if parts[0] == "hypergrad":
        if len(parts) == 2:
            return parts[1] == "method" or parts[1] in METHODS
        return len(parts) == 3 and parts[1] in METHODS and parts[2] in OPTIONS[parts[1]]
    return False


_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


def _interpolate(node: Any, file: str, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, file, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, file, f"{key}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1), m.group(2))
            if val is None:
                raise ConfigError(f"environment variable {m.group(1)} is not set and has no default",
                                  file=file, key=key, value=node)
            return val
        out = _ENV.sub(sub, node)
        if out.startswith("~"):
            out = os.path.expanduser(out)
        return out
    return node


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, merge, override, interpolate and validate an experiment file."""
    file = str(path)
    p = Path(path)
    if not p.exists():
        raise ConfigError("experiment file not found", file=file)
    data = _load_tree(p)
    for item in overrides or []:
        apply_override(data, item, file)
    data = _interpolate(data, file)
    cfg = Config(data=data, file=file, overrides=list(overrides or []))
    validate(cfg)
    _absolute_paths(cfg)
    return cfg


def _absolute_paths(cfg: Config) -> None:
    """Targets given by file path and a relative sqlite store are made absolute, so that a
    run directory's ``config.yaml`` means the same from any working directory."""
    def fix(spec: Any) -> None:
        if isinstance(spec, dict) and isinstance(spec.get("target"), str) and ":" in spec["target"]:
            path_s, _, attr = spec["target"].rpartition(":")
            p = Path(os.path.expanduser(path_s))
            if not p.is_absolute():
                for base in (cfg.base_dir, Path.cwd()):
                    if (base / p).is_file():
                        spec["target"] = f"{(base / p).resolve()}:{attr}"
                        break
    for spec in (cfg.data.get("models") or {}).values():
        fix(spec)
    for spec in cfg.data["problems"].values():
        fix(spec)
    uri = cfg.data["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.data["tracking"]["uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    cfg.data["tracking"]["runs_dir"] = str(Path(cfg.data["tracking"]["runs_dir"]).expanduser().resolve())


# -- schema ------------------------------------------------------------------------------

def _did_you_mean(name: str, options: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
            raise cfg.error("unknown key" + _did_you_mean(k, schema), key=f"{key}.{k}",
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
            raise cfg.error("unknown top-level key" + _did_you_mean(k, TOP_KEYS), key=k,
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
    if tr["precision"] not in PRECISIONS:
        raise cfg.error("unknown precision" + _did_you_mean(tr["precision"], PRECISIONS),
                        key="trainer.precision", value=tr["precision"],
                        hint="one of " + ", ".join(PRECISIONS))
    if tr["on_nonfinite"] not in ("raise", "skip"):
        raise cfg.error("must be 'raise' or 'skip'", key="trainer.on_nonfinite",
                        value=tr["on_nonfinite"])
    if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", tr["device"]):
        raise cfg.error("must be cpu, cuda, cuda:N or auto", key="trainer.device", value=tr["device"])
    d["tracking"] = check_section(cfg, d.get("tracking"), TRACKING_KEYS, "tracking")
    if d["tracking"]["experiment"] is None:
        d["tracking"]["experiment"] = d["name"]

    _validate_hypergrad(cfg, d.get("hypergrad"), "hypergrad", top=True)
    d.setdefault("hypergrad", {"method": "darts"})

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
            raise cfg.error("names no declared model" + _did_you_mean(spec["module"], models),
                            key=f"{key}.module", value=spec["module"],
                            hint="declared models: " + (", ".join(models) or "none"))
        for r in spec["reads"]:
            if r not in problems:
                raise cfg.error("names no declared problem" + _did_you_mean(r, problems),
                                key=f"{key}.reads", value=r)
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
                raise cfg.error("names no declared problem" + _did_you_mean(dep[role], problems),
                                key=f"{key}.{role}", value=dep[role])
        if dep["upper"] == dep["lower"]:
            raise cfg.error("a problem cannot depend on itself", key=key,
                            value=f"{dep['upper']} -> {dep['lower']}")
        if dep["hypergrad"] is not None:
            _validate_hypergrad(cfg, dep["hypergrad"], f"{key}.hypergrad")
        deps[i] = dep
    d["dependencies"] = deps
    _check_data_section(cfg)


def _validate_hypergrad(cfg: Config, node: Any, key: str, top: bool = False) -> None:
    """``{method: cg, iters: 5}``: options beside ``method`` belong to that method; a block
    named after a method (``darts: {alpha: 0.02}``) sets that method's options wherever it is
    used, so sweeping ``hypergrad.method`` keeps every method's settings."""
    from .hypergrad import METHODS, OPTIONS
    if node is None:
        return
    if not isinstance(node, dict):
        raise cfg.error("must be a mapping like {method: darts, alpha: 0.01}", key=key, value=node)
    method = node.get("method", "darts" if top else None)
    if method is not None and method not in METHODS:
        raise cfg.error("unknown hypergradient method" + _did_you_mean(method, METHODS),
                        key=f"{key}.method", value=method, hint="known: " + ", ".join(METHODS))
    for k, v in node.items():
        if k == "method":
            continue
        if k in METHODS:
            if not isinstance(v, dict):
                raise cfg.error(f"options of '{k}' must be a mapping", key=f"{key}.{k}", value=v)
            for ok, ov in v.items():
                _check_option(cfg, k, ok, ov, f"{key}.{k}.{ok}", set(OPTIONS[k]))
            continue
        allowed = set(OPTIONS.get(method or "darts", {}))
        if method is None:
            allowed = {o for opts in OPTIONS.values() for o in opts}
        _check_option(cfg, method, k, v, f"{key}.{k}", allowed)


def _check_option(cfg: Config, method: str | None, k: str, v: Any, key: str, allowed: set) -> None:
    from .hypergrad import METHODS
    if k not in allowed:
        raise cfg.error(f"not an option of '{method}'" + _did_you_mean(k, allowed | set(METHODS)),
                        key=key, value=v,
                        hint=("options: " + ", ".join(sorted(allowed))) if allowed else
                        f"'{method}' takes no options")
    if k == "iters" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise cfg.error("must be a positive integer", key=key, value=v)
    if k in ("alpha", "eta", "tol", "scale") and v is not None and (
            not isinstance(v, (int, float)) or isinstance(v, bool) or (v <= 0 and k != "tol")):
        raise cfg.error("must be a positive number", key=key, value=v)


def hypergrad_options(node: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """(method, its flat options, options per method) from a validated hypergrad mapping."""
    from .hypergrad import METHODS
    method = node.get("method", "darts")
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
            raise cfg.error("names no split declared in data.splits" + _did_you_mean(spec["data"], splits),
                            key=f"problems.{name}.data", value=spec["data"],
                            hint="declared splits: " + (", ".join(splits) or "none"))
    bs = data.get("batch_size", 128)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise cfg.error("must be a positive integer", key="data.batch_size", value=bs)


# -- components ------------------------------------------------------------------------------

def locate(target: str, cfg: Config | None = None, key: str | None = None) -> Any:
    """The object a target names: ``pkg.mod.Name`` or ``file.py:Name``."""
    file = cfg.file if cfg else None

    def err(msg: str, hint: str | None = None) -> ConfigError:
        return ConfigError(msg, file=file, key=key, value=target, hint=hint)

    if not isinstance(target, str) or not target:
        raise err("a target must be a dotted path or file.py:Name")
    if ":" in target:
        path_s, _, attr = target.rpartition(":")
        path = Path(os.path.expanduser(path_s))
        bases = [path] if path.is_absolute() else ([cfg.base_dir / path] if cfg else []) + [Path.cwd() / path]
        found = next((b for b in bases if b.is_file()), None)
        if found is None:
            raise err("file not found (looked in: " + ", ".join(str(b) for b in bases) + ")")
        mod_name = "mlomae_user_" + re.sub(r"\W", "_", str(found.resolve()))
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, found)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # the user's file failed: say where and what
                del sys.modules[mod_name]
                raise err(f"importing {found} failed: {type(e).__name__}: {e}") from None
        if not hasattr(module, attr):
            raise err(f"{found} has no '{attr}'" + _did_you_mean(attr, dir(module)))
        return getattr(module, attr)
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                continue
            raise err(f"importing {mod_name} failed: {e}") from None
        except Exception as e:
            raise err(f"importing {mod_name} failed: {type(e).__name__}: {e}") from None
        for j, attr in enumerate(parts[i:]):
            if not hasattr(obj, attr):
                raise err(f"'{'.'.join(parts[:i + j])}' has no '{attr}'" + _did_you_mean(attr, dir(obj)))
            obj = getattr(obj, attr)
        return obj
    raise err("cannot import it: no such module")


def _accepted(fn: Callable) -> dict[str, inspect.Parameter] | None:
    """Keyword parameters ``fn`` accepts; for a class whose ``__init__`` passes ``**kwargs``
    on, those of its bases too (as far as the chain is explicit). None: anything goes."""
    chain = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c)] if isinstance(fn, type) else [fn]
    out: dict[str, inspect.Parameter] = {}
    for f in chain:
        if f is object.__init__:
            return None
        try:
            params = inspect.signature(f).parameters
        except (TypeError, ValueError):
            return None
        for n, p in params.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(n, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return out
    return None


def check_kwargs(fn: Callable, kwargs: Mapping[str, Any], cfg: Config | None, key: str,
                 skip: tuple[str, ...] = ()) -> None:
    """Reject keyword arguments a constructor does not take, before calling it."""
    params = _accepted(fn)
    if params is None:
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n != "self"]
    for k in kwargs:
        if k not in names:
            raise ConfigError(f"{getattr(fn, '__qualname__', fn)} takes no argument '{k}'"
                              + _did_you_mean(k, names), file=cfg.file if cfg else None,
                              key=f"{key}.{k}", value=kwargs[k],
                              hint="it takes: " + ", ".join(n for n in names if n not in skip))
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
               and n not in kwargs and n not in skip]
    if missing:
        raise ConfigError(f"{getattr(fn, '__qualname__', fn)} needs argument(s) "
                          + ", ".join(missing), file=cfg.file if cfg else None, key=key)


def instantiate(spec: Mapping[str, Any], cfg: Config | None, key: str, **extra: Any) -> Any:
    """Build ``spec['target'](**rest, **extra)`` after checking the arguments."""
    target = locate(spec["target"], cfg, f"{key}.target")
    kwargs = {k: v for k, v in spec.items() if k != "target"}
    check_kwargs(target, {**kwargs, **extra}, cfg, key)
    try:
        return target(**kwargs, **extra)
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"building {spec['target']} failed: {e}",
                          file=cfg.file if cfg else None, key=key) from None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists kept as values), for tracking params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
