"""The table of datasets by name: ``DATASETS``, filled by ``@register(name)`` on each builder.

Kept apart from ``sources.py`` so that builders in other modules (``synthetic.py``) can register
without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mlomae.data.base import DatasetMeta


@dataclass(frozen=True)
class DatasetEntry:
    build: Callable[..., Any]
    meta: DatasetMeta | None  # None where it depends on the files (folders, npz)
    doc: str


DATASETS: dict[str, DatasetEntry] = {}


def register(name: str, meta: DatasetMeta | None = None):
    def deco(fn):
        DATASETS[name] = DatasetEntry(fn, meta, (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco
