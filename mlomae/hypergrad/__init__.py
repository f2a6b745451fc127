"""Hypergradient methods: one file each, one signature (see ``base.py``).

Adding a method is adding a file and a name in ``METHODS``.
"""

from __future__ import annotations

from .base import HypergradMethod, LowerLevel, UnrollTrace
from .cg import cg
from .darts import darts
from .first_order import first_order
from .neumann import neumann
from .unroll import unroll

METHODS: dict[str, HypergradMethod] = {
    "unroll": unroll,
    "darts": darts,
    "neumann": neumann,
    "cg": cg,
    "first_order": first_order,
}

# Options each method accepts, with defaults (for validation and for `mlomae graph`).
OPTIONS: dict[str, dict[str, object]] = {
    "unroll": {},
    "darts": {"alpha": 0.01, "scale": 1.0, "exact": False},
    "neumann": {"iters": 5, "eta": None},
    "cg": {"iters": 5, "tol": 1e-10},
    "first_order": {},
}

__all__ = ["METHODS", "OPTIONS", "LowerLevel", "UnrollTrace", "HypergradMethod"]
