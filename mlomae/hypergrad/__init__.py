"""Hypergradient methods: one file each, one ``Method`` subclass per file (see ``base.py``).

Adding a method is adding a file with a ``@register``-ed subclass and its module in the import
line below; ``METHODS`` then knows it, in that order.
"""

from __future__ import annotations

from . import unroll, darts, neumann, cg, first_order, sama  # noqa: F401  the registry, in order
from .base import METHODS, Keep, LowerLevel, Method, OptionError, UnrollTrace, make

DEFAULT = "darts"   # the method of an experiment that names none

__all__ = ["METHODS", "DEFAULT", "Method", "Keep", "OptionError", "make", "LowerLevel",
           "UnrollTrace"]
