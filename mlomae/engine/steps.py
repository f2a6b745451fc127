"""What one problem step leaves behind, and the two differentiable kinds of step.

- A *recorded* step (a lower problem pushed through by exact DARTS) is a plain optimizer step
  whose gradient keeps its graph, taken at copies of the parameters it starts from, so the push
  needs no forward pass of its own.
- An *unrolled* step (a lower problem pushed through by ``unroll``) is a differentiable optimizer
  update (``diffopt``) whose result stays in a window of graph tensors until an upper problem
  consumes it; the real parameters follow each step.

Both read the problems they depend on through fresh leaf copies, so that in-place updates of the
real parameters later in the outer step cannot invalidate their graphs. ``Engine`` mixes
``DifferentiableSteps`` in.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..hypergrad import UnrollTrace
from . import diffopt
from .params import swap_params
from .problem import Problem


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


@dataclass
class _Record:
    """The last step of a lower problem pushed through by exact DARTS: its local gradient
    (graph kept) and the copies of the parameters of the problems it read."""

    grads: list[Tensor]
    reads: dict[str, list[Tensor]]
    uses: int = 1  # pushes still to read it; the last one frees its graph


@dataclass
class _Window:
    """A lower problem's differentiable steps since its last consumption."""

    params: list[Tensor]
    states: list[dict]
    snaps: dict[str, list[list[Tensor]]]  # read problem -> snapshots (aligned with its params)
    snap_at: dict[str, int]               # read problem -> its step count when last snapshotted
    steps: int = 0
    consumed: bool = False
    readers: int = 1   # pushes still to read it (set by its latest step)


class DifferentiableSteps:
    """The recorded and unrolled steps of ``Engine`` (which provides ``problems``, ``reducer``,
    ``outer_step``, ``_params``, ``_named``, ``_eval``, ``_apply``, ``_nonfinite``)."""

    _records: dict[str, _Record]
    _windows: dict[str, _Window]
    _readers: dict[str, list[int]]   # per unrolled or recorded problem, per step of it in the cycle
    _steps_now: dict[str, int]       # its steps so far in this outer step

    # -- what a step keeps, and for how many pushes ------------------------------------------
    def _step_readers(self, name: str) -> int:
        """How many pushes read what this step of ``name`` keeps before its next step (counted
        on the cycle). A recorded problem's step nobody reads is a plain step, and drops the
        previous step's record; a push that then finds no record (its upper steps before the
        lower in the cycle) takes exact DARTS at the current parameters."""
        k = self._steps_now.get(name, 0)
        self._steps_now[name] = k + 1
        readers = self._readers.get(name, [])
        n = readers[k] if k < len(readers) else 1
        if n == 0:
            self._records.pop(name, None)
        return n

    # -- recorded steps (exact DARTS) -------------------------------------------------------
    def _swap_in(self, stack: ExitStack, p: Problem, own: list[Tensor]) -> dict[str, list[Tensor]]:
        """Swap ``own`` into ``p``'s module and fresh leaf copies into every module ``p`` reads
        (returned per read problem), so that in-place updates of the real parameters later in
        the outer step cannot invalidate a graph built now."""
        stack.enter_context(swap_params(p.module, {n: t for (n, _), t in zip(self._named(p), own)}))
        reads = {}
        for r in p.reads:
            qnamed = self._named(self.problems[r])
            reads[r] = [x.detach().clone().requires_grad_(True) for _, x in qnamed]
            stack.enter_context(swap_params(self.problems[r].module,
                                            {n: t for (n, _), t in zip(qnamed, reads[r])}))
        return reads

    def _recorded_step(self, p: Problem, batch: Any, readers: int = 1) -> StepRecord:
        """A plain step of ``p`` whose gradient keeps its graph, taken at copies of the
        parameters the step starts from: exact DARTS then needs no forward pass of its own
        (the mixed term -∇_x(∇_θ f · v) at the step's start, DARTS's own point)."""
        real = self._params(p)
        start = [x.detach().clone().requires_grad_(True) for x in real]
        with ExitStack() as stack:
            reads = self._swap_in(stack, p, start)
            loss, logs = self._eval(p, batch)
            grads = torch.autograd.grad(loss, start, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, start)]
        self._records[p.name] = _Record(grads=grads, reads=reads, uses=readers)
        rec = StepRecord(p.name, p.step_count + 1, self.outer_step, loss.detach(), logs)
        self._apply(p, real, self.reducer.mean([g.detach() for g in grads]), loss, rec)
        return rec

    # -- unrolled (differentiable) steps ----------------------------------------------------
    def _trace(self, q: Problem, reached: list[Problem]) -> tuple[UnrollTrace, bool]:
        """The window of ``q``'s differentiable steps for a push, and whether another push
        reads it after this one (then its graph must survive this push's backward)."""
        w = self._windows.get(q.name)
        if w is None or w.steps == 0:
            raise RuntimeError(f"no differentiable steps of '{q.name}' recorded in this outer step")
        w.consumed = True
        w.readers -= 1
        sources = []
        for r in reached:
            snaps = w.snaps.get(r.name, [])
            for j in range(len(self._params(r))):
                sources.append([s[j] for s in snaps])
        return UnrollTrace(outputs=w.params, sources=sources, steps=w.steps), w.readers > 0

    def _unrolled_step(self, p: Problem, batch: Any, readers: int = 1) -> StepRecord:
        named = self._named(p)
        real = [x for _, x in named]
        w = self._windows.get(p.name)
        if w is None or w.consumed:
            w = _Window(params=[x.detach().clone().requires_grad_(True) for x in real],
                        states=diffopt.initial_states(p.optimizer, real), snaps={}, snap_at={})
            self._windows[p.name] = w
        # inputs are read through snapshots, so later in-place updates of the real parameters
        # cannot invalidate this graph; a new snapshot is taken only when the input has changed
        with ExitStack() as stack:
            stack.enter_context(swap_params(p.module, {n: t for (n, _), t in zip(named, w.params)}))
            for r in p.reads:
                q = self.problems[r]
                qnamed = self._named(q)
                if w.snap_at.get(r) != q.step_count or r not in w.snaps:
                    snap = [x.detach().clone().requires_grad_(True) for _, x in qnamed]
                    w.snaps.setdefault(r, []).append(snap)
                    w.snap_at[r] = q.step_count
                stack.enter_context(swap_params(q.module, {n: t for (n, _), t in
                                                           zip(qnamed, w.snaps[r][-1])}))
            loss, logs = self._eval(p, batch)
            grads = torch.autograd.grad(loss, w.params, create_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, w.params)]
        grads = self.reducer.mean_differentiable(grads)
        rec = StepRecord(p.name, p.step_count + 1, self.outer_step, loss.detach(), logs)
        rec.grad_norm = norm(grads)
        if not self.reducer.all(bool(torch.isfinite(rec.grad_norm) & torch.isfinite(loss.detach()))):
            self._nonfinite(p, loss, rec.grad_norm, rec)
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
