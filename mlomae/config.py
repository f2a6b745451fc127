"""Experiment files: YAML -> one validated, resolved dict, and components by path.

What happens to a file, in order:
1. ``defaults:`` fragments are merged first (a string merges at the root, ``{key.path: file}``
   mounts a fragment at a key), then the file itself on top. Fragment paths are looked up next
   to the including file, then in the current directory, then in the project root.
2. Command-line overrides ``key.sub=value`` (values parsed as YAML) replace existing keys;
   ``+key.sub=value`` adds a new one.
3. ``${env:NAME}`` / ``${env:NAME,default}`` in strings are replaced from the environment and
   a leading ``~`` in paths is expanded.
4. The schema (``mlomae.schema``) is checked; every error names the file, the key path and the value.

Components named in the file are found and built by ``mlomae.components``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError, did_you_mean
from .schema import TOP_KEYS, TRACKING_KEYS, TRAINER_KEYS, validate

PROJECT_ROOT = Path(__file__).resolve().parent.parent



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

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-5`` as a number, as YAML 1.2 does (YAML 1.1 needs a
    dot, ``1.0e-5``, and would hand the string "1e-5" to an optimizer)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-5``); every YAML the project reads."""
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path, key: str | None = None) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path), key=key) from None
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror}", file=str(path), key=key) from None
    try:
        doc = load_yaml(text)
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
        value = load_yaml(raw) if raw.strip() else ""
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
                raise ConfigError("no such key to override" + did_you_mean(part, node),
                                  file=file, key=".".join(parts[:i + 1]),
                                  hint="prefix the override with + to add a new key")
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError("cannot set a key inside a non-mapping value", file=file,
                          key=".".join(parts[:-1]), value=node)
    if parts[-1] not in node and not add:
        raise ConfigError("no such key to override" + did_you_mean(parts[-1], node), file=file,
                          key=key, hint="prefix the override with + to add a new key")
    node[parts[-1]] = value


def _schema_key(key: str) -> bool:
    """Keys the schema knows may be set by an override even where the file leaves them out."""
    from .hypergrad import METHODS
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0] in TOP_KEYS
    sections = {"trainer": TRAINER_KEYS, "tracking": TRACKING_KEYS}
    if len(parts) == 2 and parts[0] in sections:
        return parts[1] in sections[parts[0]]
    if parts[0] == "hypergrad":
        if len(parts) == 2:
            return parts[1] == "method" or parts[1] in METHODS
        return len(parts) == 3 and parts[1] in METHODS and parts[2] in METHODS[parts[1]].options()
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
