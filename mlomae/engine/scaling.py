"""Dynamic loss scaling for fp16 autocast, one scale per problem.

fp16 has a narrow range (largest 65504, smallest normal 6.1e-5): small gradients vanish in its
backward pass. The engine multiplies a problem's loss by its scale S before differentiating it
and divides the gradients by S (exactly: S is a power of two) before anything reads them. The
rule is ``torch.amp.GradScaler``'s: a step whose scaled gradients hold an inf or a NaN while
its loss is finite is an *overflow*: skipped (parameters, optimizer and schedule untouched),
counted, and S is multiplied by ``backoff``; after ``growth_interval`` clean steps in a row S is
multiplied by ``growth``. S never goes below 1: a non-finite gradient at S = 1 is not one that a
smaller scale would cure, so the non-finite guard (``on_nonfinite``) takes it.

The scale is a Python number (the engine already brings one number per step to the host to
check finiteness, so deciding on the host costs nothing more); the state is numbers only, for
checkpoints read with ``weights_only=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class LossScale:
    """The options of dynamic loss scaling (``torch.amp.GradScaler``'s defaults)."""

    init: float = 2.0 ** 16
    growth: float = 2.0
    backoff: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        for name, value in (("init", self.init), ("growth", self.growth), ("backoff", self.backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"loss_scale.{name} must be a finite number (got {value!r})")
            object.__setattr__(self, name, float(value))
        if self.init < 1:
            raise ValueError(f"loss_scale.init must be >= 1 (got {self.init!r})")
        if not self.growth > 1:
            raise ValueError(f"loss_scale.growth must be > 1 (got {self.growth!r})")
        if not 0 < self.backoff < 1:
            raise ValueError(f"loss_scale.backoff must be between 0 and 1, exclusive (got {self.backoff!r})")
        gi = self.growth_interval
        if isinstance(gi, bool) or not isinstance(gi, int) or gi < 1:
            raise ValueError(f"loss_scale.growth_interval must be a positive integer (got {gi!r})")

    @classmethod
    def make(cls, spec: "LossScale | Mapping[str, Any] | None") -> "LossScale":
        if isinstance(spec, LossScale):
            return spec
        spec = dict(spec or {})
        known = {"init", "growth", "backoff", "growth_interval"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"loss_scale: unknown option {unknown[0]!r}; options: "
                             + ", ".join(sorted(known)))
        return cls(**spec)


class ScaleState:
    """One problem's scale, its clean steps since the scale last changed, and its overflows."""

    __slots__ = ("options", "scale", "tracker", "overflows")

    def __init__(self, options: LossScale):
        self.options = options
        self.scale = options.init
        self.tracker = 0
        self.overflows = 0

    def clean(self) -> None:
        self.tracker += 1
        if self.tracker >= self.options.growth_interval:
            self.scale *= self.options.growth
            self.tracker = 0

    def overflow(self) -> bool:
        """Back off after an overflow; False (nothing changed) when the scale is 1 or below,
        where the non-finite gradient is not the scaling's."""
        if self.scale <= 1.0:
            return False
        self.scale = max(1.0, self.scale * self.options.backoff)
        self.tracker = 0
        self.overflows += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.tracker, "overflows": self.overflows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.tracker = int(state["growth_tracker"])
        self.overflows = int(state.get("overflows", 0))
