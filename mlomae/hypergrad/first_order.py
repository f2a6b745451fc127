"""First order: drop the second-order term, so an upper problem sees only its direct gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from .base import LowerLevel, Method, register


@register
@dataclass(frozen=True)
class FirstOrder(Method):
    name = "first_order"
    summary = "drop the second-order term (the graph computes no path through the lower)"
    passes = False

    def __call__(self, v: Sequence[Tensor], lower: LowerLevel,
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        return [None for _ in inputs]
