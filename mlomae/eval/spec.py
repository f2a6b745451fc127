"""Evaluation specs: the keys each protocol takes, their checks, and the names of the results.

An experiment's ``evaluation:`` list holds one mapping per evaluation, e.g.

    evaluation:
      - {protocol: linear}                           # -> linear_top1
      - {protocol: linear, labels: 10%}              # -> linear_top1_10pct
      - {protocol: linear, model: pixels}            # -> linear_pixels_top1 (the raw-pixel floor)
      - {protocol: knn, k: 20, temperature: 0.07}    # -> knn_top1
      - {protocol: linear, test: mask}               # -> linear_mask_top1 (on the `mask` role)
      - {protocol: finetune, epochs: 5, layer_decay: 0.75}   # -> finetune_top1

Keys (defaults in ``COMMON`` and ``PROTOCOL_KEYS`` below):

- every protocol: ``model`` (default: the first model with ``features(imgs, pool)``; ``pixels`` =
  flattened normalised pixels, not for finetune), ``train`` (role, ``finetune``), ``test``
  (role, ``test``), ``labels`` (class-balanced share of the train role: ``100%``, ``10%``,
  ``1%``, any percentage), ``pool`` (``mean`` | ``cls``), ``batch_size`` (feature extraction;
  for finetune the training batch, default ``data.batch_size``), ``name`` (the result's name).
- linear: ``weight_decay`` (L2 on the weights, 1e-4), ``max_iter`` (L-BFGS iterations, 500),
  ``tol`` (stop once 10 iterations lower the objective by less than this share, 1e-3; 0: run
  to ``max_iter``; chosen on the `mask` split, benchmarks/README.md "Linear probe"),
  ``standardize`` (train mean/std, true).
- knn: ``k`` (20), ``temperature`` (0.07), ``vote`` (``weighted`` | ``majority``).
- finetune: ``epochs`` (5), ``lr`` (1e-3), ``weight_decay`` (0.05), ``layer_decay`` (0.75; 1 =
  none), ``warmup_epochs`` (1), ``label_smoothing`` (0.1), ``augment`` (the data's training
  augmentation, true), ``seed`` (default: the experiment's).

Result names use only characters MLflow accepts in metric names (no ``@`` or ``%``); values are
top-1 in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping

from ..errors import ConfigError, did_you_mean

PIXELS = "pixels"  # the model name that means "flattened normalised pixels"


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         integer: bool = False) -> Callable[[Any], str | None]:
    """A check for a number in [lo, hi] (or (lo, hi] with ``lo_open``); None when fine."""
    def check(v: Any) -> str | None:
        kinds = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds):
            return "must be an integer" if integer else "must be a number"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None
    return check


def _as_number(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _choice(*options: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else "must be one of " + ", ".join(map(str, options))


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


# key -> (default, check); None as a default means "decided at run time" (model, batch_size)
COMMON: dict[str, tuple[Any, Callable[[Any], str | None] | None]] = {
    "protocol": (..., None),
    "name": (None, _string),
    "model": (None, _string),
    "train": ("finetune", _string),
    "test": ("test", _string),
    "labels": ("100%", None),
    "pool": ("mean", _choice("mean", "cls")),
    "batch_size": (None, _num(1, integer=True)),
}
PROTOCOL_KEYS: dict[str, dict[str, tuple[Any, Callable[[Any], str | None] | None]]] = {
    "linear": {
        "weight_decay": (1e-4, _num(0)),
        "max_iter": (500, _num(1, integer=True)),
        "tol": (1e-3, _num(0)),
        "standardize": (True, _boolean),
    },
    "knn": {
        "k": (20, _num(1, integer=True)),
        "temperature": (0.07, _num(0, lo_open=True)),
        "vote": ("weighted", _choice("weighted", "majority")),
    },
    "finetune": {
        "epochs": (5, _num(1, integer=True)),
        "lr": (1e-3, _num(0, lo_open=True)),
        "weight_decay": (0.05, _num(0)),
        "layer_decay": (0.75, _num(0, 1, lo_open=True)),
        "warmup_epochs": (1, _num(0)),
        "label_smoothing": (0.1, _num(0, 1)),
        "augment": (True, _boolean),
        "seed": (None, _num(integer=True)),
    },
}


@dataclass(frozen=True)
class Labels:
    """A class-balanced share of the train role: ``fraction`` of every class (1 = all)."""

    fraction: Fraction
    text: str

    @property
    def suffix(self) -> str:
        """'' for 100%, else e.g. '_10pct' (for result names)."""
        if self.fraction == 1:
            return ""
        pct = self.fraction * 100
        return f"_{pct.numerator // pct.denominator if pct.denominator == 1 else float(pct):g}pct"


def parse_labels(value: Any, *, file: str | None = None, key: str | None = None) -> Labels:
    """'100%' / '10%' / '1%' (any percentage in (0, 100]) or a fraction such as 0.1."""
    bad = ConfigError("must be a percentage of labels per class such as 100%, 10% or 1%",
                      file=file, key=key, value=value)
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            frac = Fraction(value.strip()[:-1].strip()) / 100
        except (ValueError, ZeroDivisionError):
            raise bad from None
    elif isinstance(value, float) or (isinstance(value, int) and value == 1):
        frac = Fraction(repr(float(value)))
    else:
        raise bad
    if not 0 < frac <= 1:
        raise bad
    return Labels(frac, f"{float(frac * 100):g}%")


def check_spec(spec: Any, *, file: str | None = None, key: str = "evaluation[0]") -> dict[str, Any]:
    """The spec with defaults filled in; a ``ConfigError`` naming ``key.x`` for anything wrong."""
    if not isinstance(spec, Mapping) or "protocol" not in spec:
        raise ConfigError("each evaluation is a mapping with a 'protocol' (linear, knn, finetune, "
                          "problem)", file=file, key=key, value=spec)
    name = spec["protocol"]
    if name not in PROTOCOL_KEYS:
        raise ConfigError("unknown evaluation protocol", file=file, key=f"{key}.protocol",
                          value=name, hint="known: " + ", ".join(sorted([*PROTOCOL_KEYS, "problem"])))
    schema = {**COMMON, **PROTOCOL_KEYS[name]}
    for k in spec:
        if k not in schema:
            raise ConfigError(f"not an option of protocol '{name}'" + did_you_mean(k, schema),
                              file=file, key=f"{key}.{k}", value=spec[k],
                              hint="options: " + ", ".join(k2 for k2 in schema if k2 != "protocol"))
    out = dict(spec)
    for k, (default, check) in schema.items():
        if k not in out or out[k] is None:
            out[k] = default
            continue
        if isinstance(out[k], str) and isinstance(default, (int, float)) \
                and not isinstance(default, bool):
            out[k] = _as_number(out[k])   # YAML reads 3e-3 (no dot) as a string
        if check is not None and (why := check(out[k])):
            raise ConfigError(why, file=file, key=f"{key}.{k}", value=out[k])
    out["labels"] = parse_labels(out["labels"], file=file, key=f"{key}.labels")
    return out


def result_name(spec: Mapping[str, Any], default_model: str | None) -> str:
    """``{protocol}[_{model}][_cls][_{test role}]_top1[_{pct}pct]``: the model only when it is
    not the default one, ``cls`` pooling marked as ``_cls``, the test role only when it is not
    ``test`` (``linear_mask_top1``: a number on the `mask` split never takes the name of the test
    split's); ``name:`` in the spec replaces all of it."""
    if spec.get("name"):
        return str(spec["name"])
    parts = [spec["protocol"]]
    if spec.get("model") and spec["model"] != default_model:
        parts.append(str(spec["model"]))
    if spec.get("pool") == "cls" and spec.get("model") != PIXELS:
        parts.append("cls")
    if spec.get("test", "test") != "test":
        parts.append(str(spec["test"]))
    labels = spec["labels"] if isinstance(spec["labels"], Labels) else parse_labels(spec["labels"])
    return "_".join(parts) + "_top1" + labels.suffix


def unique_name(specs: list[Any], index: int, default_model: str | None,
                file: str | None = None) -> str:
    """The result name of ``specs[index]``, suffixed ``_{index}`` when an earlier spec of the same
    list already gives that name (so that no evaluation overwrites another's number)."""
    def name_of(i: int) -> str | None:
        s = specs[i]
        if not isinstance(s, Mapping) or s.get("protocol") not in PROTOCOL_KEYS:
            return None
        try:
            return result_name(check_spec(s, file=file, key=f"evaluation[{i}]"), default_model)
        except ConfigError:
            return None
    mine = name_of(index)
    if mine is None:
        raise ConfigError("invalid evaluation spec", file=file, key=f"evaluation[{index}]",
                          value=specs[index])
    earlier = {name_of(i) for i in range(index)}
    return mine if mine not in earlier else f"{mine}_{index}"
