"""Components by path: ``pkg.mod.Name`` or ``file.py:Name`` (relative to the experiment file),
their keyword arguments checked against the constructor's signature before anything is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from .config import Config


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
            raise err(f"{found} has no '{attr}'" + did_you_mean(attr, dir(module)))
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
                raise err(f"'{'.'.join(parts[:i + j])}' has no '{attr}'" + did_you_mean(attr, dir(obj)))
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
                              + did_you_mean(k, names), file=cfg.file if cfg else None,
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
