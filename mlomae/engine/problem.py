"""A problem: one level of a multilevel program.

A problem says *what* it optimises: ``loss(batch)`` over its module's parameters, the data it
draws batches from, how many steps it takes per step of its upper problems, and which other
problems its loss reads. The engine decides when it steps and how gradients flow.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import GraphError
from .params import trainable


class Problem:
    """Subclass and implement :meth:`loss`.

    ``loss`` returns a scalar tensor, or ``(loss, logs)`` with a dict of extra scalars to track.
    Inside ``loss`` use ``self.read(name)`` to reach the module of a problem named in ``reads``:
    never a global, so that the engine can substitute parameters (unrolled steps, snapshots).
    Randomness must come from torch's global generator, which the engine replays when it
    re-evaluates a loss for a hypergradient.

    A problem that calls more of a peer than its module (``self.peer(name).method(...)``)
    declares it in :meth:`needs`: the peer's name and the interface (a ``typing.Protocol``, or
    any class) it must satisfy; the engine checks every declaration when it connects the
    problems and names what is missing.
    """

    # True when this problem's loss differentiates the modules it reads only once whatever
    # method pushes through it: it puts its own parameters on top of their output (a head on
    # an encoder). The builder then leaves their attention fused under second-order methods.
    first_order_reads: bool = False
    # True: the problem's loader applies the pretraining augmentation.
    augment: bool = False
    # True while the engine re-evaluates ``last_batch`` for a hypergradient, at parameters a
    # method moved off the step's (a finite difference): a loss that holds an input fixed per
    # batch (a detached feature of its own module, which no gradient follows) gives it the
    # value of the batch's step, so that the re-evaluation does not move it either.
    replaying: bool = False

    def __init__(self, name: str, module: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, data: Iterable | None = None, steps: int = 1,
                 grad_clip: float | None = None, reads: Sequence[str] = ()):
        if steps < 1:
            raise ValueError(f"problem '{name}': steps must be >= 1 (got {steps})")
        self.name = name
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.steps = int(steps)
        self.grad_clip = grad_clip
        self.reads = tuple(reads)
        self.step_count = 0
        self.skipped = 0
        # this problem's steps over the whole run, when a runner knows it (the builder sets it):
        # what options given as a share of the run ("warm up for 10% of pretraining") resolve to
        self.total_steps: int | None = None
        self.last_batch: Any = None
        self.last_rng: Any = None
        self._iter: Iterator | None = None
        self._peers: dict[str, "Problem"] = {}

    # -- what a subclass writes -----------------------------------------------------------
    def loss(self, batch: Any) -> Tensor | tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def needs(self) -> Mapping[str, type]:
        """Peer name -> the interface this problem calls on that peer (beyond its module)."""
        return {}

    # -- what a subclass may use ----------------------------------------------------------
    def read(self, name: str) -> nn.Module:
        """The module of problem ``name``, which this problem declared in ``reads``."""
        return self.peer(name).module

    def peer(self, name: str) -> "Problem":
        try:
            return self._peers[name]
        except KeyError:
            raise GraphError(f"problem '{self.name}' reads '{name}' but does not declare it: "
                             f"add it to problems.{self.name}.reads") from None

    # -- what the engine uses -------------------------------------------------------------
    @contextmanager
    def replay(self) -> Iterator[None]:
        """``replaying`` is True inside."""
        was, self.replaying = self.replaying, True
        try:
            yield
        finally:
            self.replaying = was

    def _connect(self, peers: Mapping[str, "Problem"]) -> None:
        """Give the problem its peers (the problems in ``reads``) and check :meth:`needs`."""
        self._peers = dict(peers)
        for name, interface in self.needs().items():
            peer = self.peer(name)
            if isinstance(peer, interface):
                continue
            members = [m for m in vars(interface) if not m.startswith("_")]
            missing = [m for m in members if not hasattr(peer, m)] or members
            raise GraphError(f"problem '{self.name}' needs '{name}' to be a {interface.__name__} "
                             f"({', '.join(members)}); {type(peer).__name__} has no "
                             f"{', '.join(missing)}")

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return trainable(self.module)

    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params()]

    @property
    def lr(self) -> float:
        if self.optimizer is None:
            return 1.0
        return float(self.optimizer.param_groups[0]["lr"])

    def next_batch(self) -> Any:
        if self.data is None:
            return None
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.data)
            try:
                return next(self._iter)
            except StopIteration:
                raise GraphError(f"problem '{self.name}': its data yields no batch") from None

    def state_dict(self) -> dict[str, Any]:
        state = {"module": self.module.state_dict(), "step_count": self.step_count,
                 "skipped": self.skipped}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None and hasattr(self.scheduler, "state_dict"):
            state["scheduler"] = self.scheduler.state_dict()
        if self.data is not None and hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.step_count = int(state["step_count"])
        self.skipped = int(state.get("skipped", 0))
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.data is not None and "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
            self._iter = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, steps={self.steps}, reads={list(self.reads)})"
