"""Split specs: which items of a base split (``train`` or ``test``) each role of an experiment reads.

Forms (string or dict):

    train                       the whole base split
    train[:80%]  train[80%:]    a fraction of it (percent, or a decimal such as 0.8)
    train[1000:2000]            a range of positions (integers count items)
    train[:80%]@balanced:10%    then, per class, 10% of that class's items (or @balanced:100
                                for 100 items of every class)
    {from: train, range: [0.0, 0.8], labels_per_class: 0.1}
    {from: train, indices: path.npy | path.txt}   explicit item numbers of the base split

Semantics, in order:
1. Positions refer to a permutation of the base split drawn from the seed given to
   ``resolve_splits`` (``np.random.default_rng([seed, crc32(base name)])``): every role that
   reads the same base split slices the same permutation, so ``train[:80%]`` and ``train[80%:]``
   are disjoint and together cover ``train``. Index files are *not* permuted: they name items of
   the base split as stored.
2. A fraction f of n items ends at position floor(f * n + 1/2) (rounded half up, exactly:
   fractions are kept as ``Fraction``), so neighbouring slices share their boundary.
3. ``labels_per_class`` f keeps, for every class c with n_c items in the slice, the first
   max(1, floor(f * n_c + 1/2)) of them in permuted order; an integer k keeps k per class. The
   result keeps the permuted order.
In a dict, a float (range entry or labels_per_class) is a fraction and an integer a count:
[0, 0.8] is the first 80%, labels_per_class 1 is one item per class and 1.0 all of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mlomae.data.base import dataset_labels
from mlomae.errors import ConfigError

Bound = int | Fraction  # an int counts items, a Fraction is a share of the base split

DEFAULT_DISJOINT = ("finetune", "mask")
DEFAULT_TEST_ROLES = ("test",)

_SPEC = re.compile(r"^\s*(?P<src>[A-Za-z_][\w\-]*)\s*(?:\[(?P<a>[^:\]]*):(?P<b>[^\]]*)\])?\s*"
                   r"(?:@balanced:(?P<lpc>\S+))?\s*$")


@dataclass(frozen=True)
class SplitSpec:
    source: str
    start: Bound | None = None
    stop: Bound | None = None
    labels_per_class: Bound | None = None
    indices: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.source


def _number(tok: Any, what: str, key: str | None, spec: Any, *, fraction_max: int = 1) -> Bound:
    """'80%' / 0.8 / '0.8' -> Fraction; 1000 / '1000' -> int."""
    bad = ConfigError(f"{what} must be a count (1000), a percentage (80%) or a fraction (0.8)",
                      key=key, value=spec)
    if isinstance(tok, bool):
        raise bad
    if isinstance(tok, int):
        value: Bound = tok
    elif isinstance(tok, float):
        value = Fraction(repr(tok))  # exact decimal: 0.1 is 1/10, not 0.1000000000000000055
    elif isinstance(tok, str):
        t = tok.strip()
        try:
            if t.endswith("%"):
                value = Fraction(t[:-1].strip()) / 100
            elif re.fullmatch(r"[+-]?\d+", t):
                value = int(t)
            else:
                value = Fraction(t)
        except (ValueError, ZeroDivisionError):
            raise bad from None
    else:
        raise bad
    if value < 0 or (isinstance(value, Fraction) and value > fraction_max):
        raise ConfigError(f"{what} out of range: a fraction must lie in [0, 1] (0%..100%), a "
                          f"count must be >= 0", key=key, value=spec)
    return value


def parse_split(spec: str | Mapping[str, Any] | SplitSpec, *, key: str | None = None) -> SplitSpec:
    """A split spec (string or dict form, see the module doc) as a ``SplitSpec``."""
    if isinstance(spec, SplitSpec):
        return spec
    if isinstance(spec, str):
        m = _SPEC.match(spec)
        if not m:
            raise ConfigError("cannot read split spec; forms: train, train[:80%], "
                              "train[1000:2000], train[:80%]@balanced:10%", key=key, value=spec)
        a = _number(m["a"], "split start", key, spec) if m["a"] and m["a"].strip() else None
        b = _number(m["b"], "split end", key, spec) if m["b"] and m["b"].strip() else None
        lpc = _number(m["lpc"], "labels per class", key, spec) if m["lpc"] else None
        out = SplitSpec(m["src"], a, b, lpc, None, spec.strip())
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"from", "range", "labels_per_class", "indices"}
        if unknown:
            raise ConfigError(f"unknown split key(s) {sorted(unknown)}; known: from, range, "
                              f"labels_per_class, indices", key=key, value=dict(spec))
        if not isinstance(spec.get("from"), str):
            raise ConfigError("a split needs 'from: <base split>' (train or test)", key=key,
                              value=dict(spec))
        rng = spec.get("range")
        if rng is not None and (not isinstance(rng, (list, tuple)) or len(rng) != 2):
            raise ConfigError("split range must be [start, end]", key=key, value=dict(spec))
        if rng is not None and spec.get("indices") is not None:
            raise ConfigError("a split takes either 'range' or 'indices', not both", key=key,
                              value=dict(spec))
        a, b = ([None if r is None else _number(r, "split range", key, dict(spec)) for r in rng]
                if rng is not None else (None, None))
        lpc = spec.get("labels_per_class")
        lpc = None if lpc is None else _number(lpc, "labels_per_class", key, dict(spec))
        idx = spec.get("indices")
        out = SplitSpec(spec["from"], a, b, lpc, None if idx is None else str(idx),
                        json.dumps(dict(spec), default=str, sort_keys=True))
    else:
        raise ConfigError("a split spec is a string (train[:80%]) or a mapping "
                          "({from: train, range: [0, 0.8]})", key=key, value=spec)
    if out.labels_per_class is not None and out.labels_per_class == 0:
        raise ConfigError("labels per class must lie in (0, 1] as a fraction or be a count >= 1",
                          key=key, value=spec)
    return out


def base_permutation(n: int, source: str, seed: int) -> np.ndarray:
    """The seeded order of a base split that every slice of it refers to."""
    return np.random.default_rng([seed, zlib.crc32(source.encode())]).permutation(n)


def _position(bound: Bound | None, n: int, default: int) -> int:
    if bound is None:
        return default
    if isinstance(bound, Fraction):
        return math.floor(bound * n + Fraction(1, 2))
    return bound


def _keep_count(lpc: Bound, n_c: int) -> int:
    if isinstance(lpc, Fraction):
        return max(1, math.floor(lpc * n_c + Fraction(1, 2)))
    return lpc


def _read_index_file(path: str, n: int, role: str, key: str, spec: SplitSpec) -> np.ndarray:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise ConfigError(f"split '{role}': index file {p} not found", key=key, value=str(spec))
    try:
        idx = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise ConfigError(f"split '{role}': cannot read index file {p} ({e}); expected .npy or "
                          f".txt of integers", key=key, value=str(spec)) from None
    idx = np.asarray(idx).reshape(-1)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError(f"split '{role}': index file {p} holds {idx.dtype}, not integers",
                          key=key, value=str(spec))
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ConfigError(f"split '{role}': index file {p} has items outside 0..{n - 1} of "
                          f"'{spec.source}'", key=key, value=str(spec))
    if np.unique(idx).size != idx.size:
        raise ConfigError(f"split '{role}': index file {p} repeats items", key=key, value=str(spec))
    return idx.astype(np.int64)


def resolve_split(spec: SplitSpec, dataset: Any, seed: int, *, role: str = "?",
                  key: str | None = None) -> np.ndarray:
    """The item numbers (into the base split) that one spec selects."""
    n = len(dataset)
    if spec.indices is not None:
        idx = _read_index_file(spec.indices, n, role, key, spec)
    else:
        a, b = _position(spec.start, n, 0), _position(spec.stop, n, n)
        if b > n:
            raise ConfigError(f"split '{role}' = '{spec}' reaches item {b} but '{spec.source}' has "
                              f"{n} items", key=key, value=str(spec))
        if a >= b:
            raise ConfigError(f"split '{role}' = '{spec}' is empty or out of order (items {a}..{b} "
                              f"of {n})", key=key, value=str(spec))
        idx = base_permutation(n, spec.source, seed)[a:b]
    if spec.labels_per_class is not None:
        labels = dataset_labels(dataset)
        if labels is None:
            raise ConfigError(f"split '{role}' = '{spec}' asks for labels per class but "
                              f"'{spec.source}' has no class labels", key=key, value=str(spec))
        lab = labels[idx]
        keep = np.zeros(idx.size, dtype=bool)
        for c in np.unique(lab):
            members = np.flatnonzero(lab == c)
            k = _keep_count(spec.labels_per_class, members.size)
            if k > members.size:
                raise ConfigError(f"split '{role}' = '{spec}' wants {k} items of class {c} but the "
                                  f"slice holds {members.size}", key=key, value=str(spec))
            keep[members[:k]] = True
        idx = idx[keep]
    if idx.size == 0:
        raise ConfigError(f"split '{role}' = '{spec}' selects no items", key=key, value=str(spec))
    return idx


def resolve_splits(spec_by_role: Mapping[str, Any], datasets: Mapping[str, Any], seed: int, *,
                   disjoint: Sequence[str] = DEFAULT_DISJOINT,
                   test_roles: Sequence[str] = DEFAULT_TEST_ROLES,
                   key_prefix: str = "data.splits") -> dict[str, np.ndarray]:
    """Resolve every role's spec into item numbers of its base split, and check the whole.

    ``datasets`` maps base split names to datasets (or label arrays). Checks: only roles in
    ``test_roles`` may read the base split ``test``; the roles in ``disjoint`` (the labeled
    training roles, by default finetune and mask) must not share items. Use ``parse_split(spec)
    .source`` for the base split a role reads.
    """
    specs = {role: parse_split(s, key=f"{key_prefix}.{role}") for role, s in spec_by_role.items()}
    for role, spec in specs.items():
        key = f"{key_prefix}.{role}"
        if spec.source == "test" and role not in test_roles:
            raise ConfigError(f"role '{role}' reads the test split ('{spec}'); only "
                              f"{', '.join(repr(r) for r in test_roles)} may: hold out part of "
                              f"train instead, e.g. train[80%:]", key=key, value=str(spec))
        if spec.source not in datasets:
            raise ConfigError(f"split '{role}' reads base split '{spec.source}', which does not "
                              f"exist; available: {', '.join(datasets)}", key=key, value=str(spec))
    out = {role: resolve_split(spec, datasets[spec.source], seed, role=role,
                               key=f"{key_prefix}.{role}") for role, spec in specs.items()}
    check_disjoint(out, {r: s.source for r, s in specs.items()}, disjoint,
                   texts={r: str(s) for r, s in specs.items()}, key_prefix=key_prefix)
    return out


def check_disjoint(indices: Mapping[str, np.ndarray], sources: Mapping[str, str],
                   roles: Iterable[str], *, texts: Mapping[str, str] | None = None,
                   key_prefix: str = "data.splits") -> None:
    """Raise if two of ``roles`` (those present) read the same items of the same base split."""
    present = [r for r in roles if r in indices]
    texts = texts or {}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if sources[a] != sources[b]:
                continue
            overlap = np.intersect1d(indices[a], indices[b]).size
            if overlap:
                raise ConfigError(
                    f"splits '{a}' ({texts.get(a, sources[a])}) and '{b}' "
                    f"({texts.get(b, sources[b])}) share {overlap} items of '{sources[a]}'; they "
                    f"must be disjoint, e.g. {a}: train[:80%], {b}: train[80%:]",
                    key=f"{key_prefix}.{b}")


def save_split_indices(directory: str | os.PathLike, indices: Mapping[str, np.ndarray], *,
                       specs: Mapping[str, Any] | None = None, seed: int | None = None) -> Path:
    """Write ``splits.npz`` (one int64 array per role) and ``splits.json`` (sizes, hashes, specs)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {role: np.asarray(v, dtype=np.int64) for role, v in indices.items()}
    np.savez(d / "splits.npz", **arrays)
    info = {"seed": seed, "roles": {
        role: {"size": int(a.size), "sha256": hashlib.sha256(a.tobytes()).hexdigest()[:16],
               **({"spec": str(parse_split(specs[role]))} if specs and role in specs else {})}
        for role, a in arrays.items()}}
    (d / "splits.json").write_text(json.dumps(info, indent=2) + "\n")
    return d / "splits.npz"


def load_split_indices(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays ``save_split_indices`` wrote."""
    with np.load(Path(directory) / "splits.npz") as z:
        return {k: z[k] for k in z.files}
