"""What one problem step leaves behind: its log entry, and what it keeps for the pushes that
read it.

- A step whose lower problem is pushed through by a method that keeps ``Keep.STEP_GRAPH``
  (exact DARTS) is a plain optimizer step whose gradient keeps its graph, taken at copies of the
  parameters it starts from, so the push needs no forward pass of its own.
- A step kept as ``Keep.UNROLLED`` (``unroll``) is a differentiable optimizer update
  (``diffopt``) whose result stays in a window of graph tensors until an upper problem consumes
  it; the real parameters follow each step.
- ``Keep.STEP_GRADIENT`` (SAMA) keeps the gradient the optimizer applied, detached; it lives
  across outer steps (and in the engine's state) until the problem steps again.

Both graph-keeping kinds read the problems they depend on through fresh leaf copies, so that
in-place updates of the real parameters later in the outer step cannot invalidate their graphs.
Under fp16 autocast they run in float32, unscaled: a push differentiates their gradients once
more, and a second derivative's two factors do not both fit fp16's range under one loss scale
(``engine.py``).
``KeptSteps`` owns all three records and the count of pushes still to read each graph; the
engine hands it to the pushes. It reaches the engine only through the engine's public methods
(``params_of``, ``named_params_of``, ``evaluate``, ``apply_gradients``, ``nonfinite``,
``scaling``).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from ..hypergrad import UnrollTrace
from . import diffopt
from .params import swap_params
from .problem import Problem

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class StepRecord:
    """What happened in one problem step (tensors stay on device until a callback asks)."""

    problem: str
    step: int                    # the problem's own step count after this step
    outer_step: int              # the outer step this problem step belongs to (0-based)
    loss: Tensor
    logs: dict[str, Any] = field(default_factory=dict)
    grad_norm: Tensor | None = None
    hypergrad_norm: Tensor | None = None
    seconds: float = 0.0
    skipped: bool = False
    loss_scale: float | None = None   # the fp16 loss scale the step's loss was multiplied by


@dataclass
class KeptGraph:
    """The last step of a problem kept as ``Keep.STEP_GRAPH``: its local gradient (graph kept)
    and the copies of the parameters of the problems it read."""

    grads: list[Tensor]
    reads: dict[str, list[Tensor]]
    readers: int = 1  # pushes still to read it; the last one frees its graph


@dataclass
class UnrolledWindow:
    """A problem's differentiable steps since its last consumption (``Keep.UNROLLED``)."""

    params: list[Tensor]
    states: list[dict]
    snaps: dict[str, list[list[Tensor]]]  # read problem -> snapshots (aligned with its params)
    snap_at: dict[str, int]               # read problem -> its step count when last snapshotted
    steps: int = 0
    consumed: bool = False
    readers: int = 1   # pushes still to read it (set by its latest step)


class KeptSteps:
    """What steps keep for pushes, and for how many: the one owner of those counts.

    ``readers`` comes from ``Graph.step_readers`` over the schedule: per problem that keeps a
    graph, per step of it in one outer step, how many pushes read what that step kept.
    """

    def __init__(self, engine: "Engine", readers: dict[str, list[int]]):
        self.engine = engine
        self.readers = readers
        self.graphs: dict[str, KeptGraph] = {}
        self.windows: dict[str, UnrolledWindow] = {}
        self.gradients: dict[str, list[Tensor]] = {}   # detached; outlive the outer step
        self._steps_now: dict[str, int] = {}

    def end_outer_step(self) -> None:
        """No graph outlives its outer step (detached gradients do)."""
        self.graphs.clear()
        self.windows.clear()
        self._steps_now.clear()

    def start_step(self, name: str) -> int:
        """How many pushes read what this step of ``name`` keeps before its next step (counted
        on the cycle). A kept-graph problem's step nobody reads is a plain step, and drops the
        previous step's graph; a push that then finds none takes its method at the current
        parameters."""
        k = self._steps_now.get(name, 0)
        self._steps_now[name] = k + 1
        readers = self.readers.get(name, [])
        n = readers[k] if k < len(readers) else 1
        if n == 0:
            self.graphs.pop(name, None)
        return n

    def keep_gradient(self, name: str, grads: Sequence[Tensor]) -> None:
        self.gradients[name] = [g.detach().clone() for g in grads]

    def take_graph(self, name: str) -> tuple[KeptGraph | None, bool]:
        """The kept graph of ``name``'s last step (None if there is none) and whether another
        push reads it after this one; the last reader frees it."""
        kept = self.graphs.get(name)
        if kept is None:
            return None, False
        kept.readers -= 1
        if kept.readers <= 0:
            del self.graphs[name]
        return kept, kept.readers > 0

    def take_window(self, q: Problem, reached: list[Problem]) -> tuple[UnrollTrace, bool]:
        """The window of ``q``'s differentiable steps for a push, and whether another push
        reads it after this one (then its graph must survive this push's backward)."""
        w = self.windows.get(q.name)
        if w is None or w.steps == 0:
            raise RuntimeError(f"no differentiable steps of '{q.name}' recorded in this outer step")
        w.consumed = True
        w.readers -= 1
        sources = []
        for r in reached:
            snaps = w.snaps.get(r.name, [])
            for j in range(len(self.engine.params_of(r))):
                sources.append([s[j] for s in snaps])
        return UnrollTrace(outputs=w.params, sources=sources, steps=w.steps), w.readers > 0

    def state_dict(self) -> dict[str, list[Tensor]]:
        return {n: list(g) for n, g in self.gradients.items()}

    def load_state_dict(self, state: dict[str, list[Tensor]]) -> None:
        self.gradients = {n: [t.clone() for t in g] for n, g in state.items()}

    # -- the two graph-keeping steps ------------------------------------------------------------
    def _swap_in(self, stack: ExitStack, p: Problem, own: list[Tensor]) -> dict[str, list[Tensor]]:
        """Swap ``own`` into ``p``'s module and fresh leaf copies into every module ``p`` reads
        (returned per read problem), so that in-place updates of the real parameters later in
        the outer step cannot invalidate a graph built now."""
        eng = self.engine
        stack.enter_context(swap_params(p.module, {n: t for (n, _), t in zip(eng.named_params_of(p), own)}))
        reads = {}
        for r in p.reads:
            qnamed = eng.named_params_of(eng.problems[r])
            reads[r] = [x.detach().clone().requires_grad_(True) for _, x in qnamed]
            stack.enter_context(swap_params(eng.problems[r].module,
                                            {n: t for (n, _), t in zip(qnamed, reads[r])}))
        return reads

    def graph_step(self, p: Problem, batch: Any, readers: int = 1) -> StepRecord:
        """A plain step of ``p`` whose gradient keeps its graph, taken at copies of the
        parameters the step starts from: exact DARTS then needs no forward pass of its own
        (the mixed term -∇_x(∇_θ f · v) at the step's start, DARTS's own point)."""
        eng = self.engine
        real = eng.params_of(p)
        start = [x.detach().clone().requires_grad_(True) for x in real]
        with ExitStack() as stack:
            reads = self._swap_in(stack, p, start)
            loss, logs = eng.evaluate(p, batch, autocast=not eng.scaling)
            grads = torch.autograd.grad(loss, start, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, start)]
        self.graphs[p.name] = KeptGraph(grads=grads, reads=reads, readers=readers)
        rec = StepRecord(p.name, p.step_count + 1, eng.outer_step, loss.detach(), logs)
        eng.apply_gradients(p, real, eng.reducer.mean([g.detach() for g in grads]), loss, rec)
        return rec

    def unrolled_step(self, p: Problem, batch: Any, readers: int = 1) -> StepRecord:
        eng = self.engine
        named = eng.named_params_of(p)
        real = [x for _, x in named]
        w = self.windows.get(p.name)
        if w is None or w.consumed:
            w = UnrolledWindow(params=[x.detach().clone().requires_grad_(True) for x in real],
                               states=diffopt.initial_states(p.optimizer, real), snaps={}, snap_at={})
            self.windows[p.name] = w
        # inputs are read through snapshots, so later in-place updates of the real parameters
        # cannot invalidate this graph; a new snapshot is taken only when the input has changed
        with ExitStack() as stack:
            stack.enter_context(swap_params(p.module, {n: t for (n, _), t in zip(named, w.params)}))
            for r in p.reads:
                q = eng.problems[r]
                qnamed = eng.named_params_of(q)
                if w.snap_at.get(r) != q.step_count or r not in w.snaps:
                    snap = [x.detach().clone().requires_grad_(True) for _, x in qnamed]
                    w.snaps.setdefault(r, []).append(snap)
                    w.snap_at[r] = q.step_count
                stack.enter_context(swap_params(q.module, {n: t for (n, _), t in
                                                           zip(qnamed, w.snaps[r][-1])}))
            loss, logs = eng.evaluate(p, batch, autocast=not eng.scaling)
            grads = torch.autograd.grad(loss, w.params, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, w.params)]
        grads = eng.reducer.mean_differentiable(grads)
        rec = StepRecord(p.name, p.step_count + 1, eng.outer_step, loss.detach(), logs)
        rec.grad_norm = norm(grads)
        if not eng.reducer.all(bool(torch.isfinite(rec.grad_norm) & torch.isfinite(loss.detach()))):
            eng.nonfinite(p, loss, rec.grad_norm, rec)
            p.step_count += 1
            return rec
        if p.grad_clip is not None:
            grads = diffopt.clip_by_total_norm(grads, p.grad_clip)
        new, states = diffopt.step(p.optimizer, real, w.params, grads, w.states)
        w.params, w.states, w.steps, w.readers = new, states, w.steps + 1, readers
        with torch.no_grad():
            torch._foreach_copy_(real, new)
        diffopt.write_back(p.optimizer, real, states)
        if p.scheduler is not None:
            with warnings.catch_warnings():  # the update was ours, not optimizer.step()'s
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                p.scheduler.step()
        p.step_count += 1
        return rec


def fill(ts: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [t if t is not None else torch.zeros_like(x) for t, x in zip(ts, like)]


def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def norm(ts: Sequence[Tensor | None]) -> Tensor:
    present = [t.detach() for t in ts if t is not None]
    if not present:
        return torch.zeros(())
    norms = torch._foreach_norm(present)
    if any(n.dtype != norms[0].dtype for n in norms):
        norms = [n.float() for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms).float())
