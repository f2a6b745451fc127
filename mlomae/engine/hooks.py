"""What the engine calls out to: the gradient reducer and the runner's callbacks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .steps import StepRecord

if TYPE_CHECKING:
    from .engine import Engine


class Reducer:
    """Averages gradients over data-parallel processes; this one process is the identity.

    ``mean`` for gradients and hypergradients, ``mean_differentiable`` for the gradients of
    recorded (unrolled) steps, ``all`` for a decision every process must take alike."""

    def mean(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        return tensors

    def mean_differentiable(self, tensors: list[Tensor]) -> list[Tensor]:
        return tensors

    def all(self, flag: bool) -> bool:
        return flag


class Callback:
    """Hooks the runner attaches: tracking, checkpoints, progress. All optional."""

    def on_run_start(self, engine: "Engine") -> None: ...
    def on_problem_step(self, engine: "Engine", record: StepRecord) -> None: ...
    def on_outer_step(self, engine: "Engine", step: int, records: list[StepRecord]) -> None: ...
    def on_run_end(self, engine: "Engine") -> None: ...
