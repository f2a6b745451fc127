"""The engine: runs the schedule, assembles every gradient, steps every optimizer.

One outer step is one period of the schedule (``Graph.cycle``). For each problem step the
engine draws a batch, evaluates the loss, and takes gradients with ``torch.autograd.grad``:
for a problem with lower problems, with respect to its own parameters *and* to the lower
problems its loss reads, whose adjoints it then pushes down the hypergradient paths (a problem
before the problems it reads), each push by the method of that edge. Graphs live only within
one outer step.

Under fp16 autocast every problem's loss is scaled before it is differentiated and its
gradients unscaled at once (``scaling.py``): the direct gradient and the adjoints handed to the
pushes are unscaled, and every push sees float32 quantities only: the lower losses they
re-evaluate run without autocast, and so do the lower steps whose graphs a push differentiates
(unroll's recorded steps, exact DARTS's kept step), since one scale cannot keep both factors of a
second derivative within fp16's range. bf16 and float32 runs take none of this.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import GraphError, NonFiniteError
from ..hypergrad import DEFAULT, Keep, LowerLevel, Method
from . import diffopt, rng
from .graph import Dependency, Graph
from .hooks import Callback, Reducer
from .problem import Problem
from .scaling import LossScale, ScaleState
from .steps import KeptSteps, StepRecord, add, fill, norm


class Engine:
    """``method`` is the default hypergradient method: a name with its ``options``, or a
    ``Method`` object (``Darts(alpha=0.02)``); ``method_options`` holds options per method name
    (kept when the default changes). Unknown methods or options raise ``GraphError``.

    ``autocast_dtype=torch.float16`` turns on dynamic loss scaling with ``loss_scale`` (a
    ``LossScale`` or a mapping of its options; GradScaler's defaults)."""

    def __init__(self, problems: Sequence[Problem], dependencies: Sequence[Dependency] = (), *,
                 method: "str | Method" = DEFAULT, options: Mapping[str, Any] | None = None,
                 method_options: Mapping[str, Mapping[str, Any]] | None = None,
                 device: str | torch.device = "cpu", on_nonfinite: str = "raise",
                 autocast_dtype: torch.dtype | None = None, callbacks: Sequence[Callback] = (),
                 reducer: "Reducer | None" = None,
                 loss_scale: "LossScale | Mapping[str, Any] | None" = None):
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip' (got {on_nonfinite!r})")
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.graph = Graph({p.name: p.steps for p in problems},
                           {p.name: p.reads for p in problems}, dependencies,
                           default_method=method, default_options=options,
                           method_options=method_options,
                           reads_once=[p.name for p in problems if p.first_order_reads])
        for p in problems:
            p._connect({r: self.problems[r] for r in p.reads})
        self.device = torch.device(device)
        self.on_nonfinite = on_nonfinite
        self.autocast_dtype = autocast_dtype
        self.loss_scale = LossScale.make(loss_scale)
        self.scales = {n: ScaleState(self.loss_scale) for n in self.problems}
        # each problem's last hypergradient, flat: for the successive-step cosine it logs
        self.last_hypergrad: dict[str, Tensor] = {}
        self.callbacks = list(callbacks)
        self.reducer = reducer or Reducer()
        self.schedule = self.graph.cycle()
        self.kept = KeptSteps(self, self.graph.step_readers(self.schedule))
        for plan in self.graph.plans.values():
            for name, m in plan.methods.items():
                why = m.unsupported(self.problems[name].optimizer)
                if why:
                    raise GraphError(f"problem '{name}' is pushed through by {m.name}: {why}")
        for name in self.graph.unrolled():
            opt = self.problems[name].optimizer
            if opt is None or not diffopt.supported(opt):
                raise GraphError(f"problem '{name}' is unrolled, which needs an sgd, adam or adamw "
                                 f"optimizer (got {type(opt).__name__ if opt else 'none'})")
        self.outer_step = 0
        self._param_cache: dict[str, list[Tensor]] = {}
        self._named_cache: dict[str, list[tuple[str, Tensor]]] = {}
        self._cuda = [self.device.index or 0] if self.device.type == "cuda" else []

    # -- parameters, looked up once per outer step -----------------------------------------
    def params_of(self, p: Problem) -> list[Tensor]:
        """``p.params()``, cached until the outer step ends: a module walk per lookup cost ~1%
        of a 101k-MLP DARTS outer step (benchmarks/README.md, question 3a). Which parameters
        train may change between outer steps, not within one."""
        got = self._param_cache.get(p.name)
        if got is None:
            got = self._param_cache[p.name] = p.params()
        return got

    def named_params_of(self, p: Problem) -> list[tuple[str, Tensor]]:
        got = self._named_cache.get(p.name)
        if got is None:
            got = self._named_cache[p.name] = p.named_params()
        return got

    def _forget(self) -> None:
        self.kept.end_outer_step()  # no graph outlives its outer step
        self._param_cache.clear()
        self._named_cache.clear()

    # -- running ----------------------------------------------------------------------------
    def run(self, steps: int) -> None:
        """Run until ``steps`` outer steps are done (counting those already done)."""
        for cb in self.callbacks:
            cb.on_run_start(self)
        while self.outer_step < steps:
            self.step()
        for cb in self.callbacks:
            cb.on_run_end(self)

    def step(self) -> list[StepRecord]:
        """One outer step: one period of the schedule."""
        records = []
        self._forget()  # parameters are looked up afresh for each outer step
        try:
            for name in self.schedule:
                rec = self._step_problem(self.problems[name])
                records.append(rec)
                for cb in self.callbacks:
                    cb.on_problem_step(self, rec)
        finally:
            self._forget()
        self.outer_step += 1
        for cb in self.callbacks:
            cb.on_outer_step(self, self.outer_step, records)
        return records

    # -- one problem step -------------------------------------------------------------------
    @property
    def scaling(self) -> bool:
        """Whether losses are scaled: under fp16 autocast."""
        return self.autocast_dtype is torch.float16

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def evaluate(self, p: Problem, batch: Any, autocast: bool = True) -> tuple[Tensor, dict[str, Any]]:
        """``p.loss(batch)`` under the engine's autocast (``autocast=False``: in the parameters'
        own precision), as (loss, logs)."""
        with self._autocast() if autocast else nullcontext():
            out = p.loss(batch)
        if isinstance(out, tuple):
            loss, logs = out
        else:
            loss, logs = out, {}
        return loss, logs

    def _step_problem(self, p: Problem) -> StepRecord:
        t0 = time.perf_counter()
        batch = _to_device(p.next_batch(), self.device)
        state = rng.capture(self._cuda)
        keep = self.graph.keeps[p.name]
        if keep is Keep.UNROLLED:
            rec = self.kept.unrolled_step(p, batch, self.kept.start_step(p.name))
        elif keep is Keep.STEP_GRAPH and (readers := self.kept.start_step(p.name)):
            rec = self.kept.graph_step(p, batch, readers)
        else:
            rec = self._plain_step(p, batch)
        p.last_batch, p.last_rng = batch, state
        rec.seconds = time.perf_counter() - t0
        return rec

    def _gradients(self, p: Problem, batch: Any, params: list[Tensor] | None = None):
        """Loss, logs, direct gradient and hypergradient of ``p`` on ``batch``."""
        params = self.params_of(p) if params is None else params
        plan = self.graph.plans.get(p.name)
        loss, logs = self.evaluate(p, batch)
        entered = [self.problems[n] for n in plan.enters] if plan else []
        targets = params + [t for q in entered for t in self.params_of(q)]
        scale = self.scales[p.name].scale if self.scaling else None
        if scale is None:
            grads = list(torch.autograd.grad(loss, targets, allow_unused=True)) if targets else []
        else:
            logs = {**logs, "loss_scale": scale}
            grads = list(torch.autograd.grad(loss.float() * scale, targets, allow_unused=True)) \
                if targets else []
            present = [g for g in grads if g is not None]
            if present:   # unscaled before anything reads them: clipping, the guard, the pushes
                torch._foreach_mul_(present, 1.0 / scale)
        grads = self.reducer.mean(grads)
        direct = grads[:len(params)]
        hyper = None
        if plan:
            adj, i = {}, len(params)
            for q in entered:
                n = len(self.params_of(q))
                adj[q.name] = fill(grads[i:i + n], self.params_of(q))
                i += n
            hyper = self._hypergradient(p, adj)
        return loss, logs, direct, hyper

    def _plain_step(self, p: Problem, batch: Any) -> StepRecord:
        params = self.params_of(p)
        loss, logs, direct, hyper = self._gradients(p, batch, params)
        rec = StepRecord(p.name, p.step_count + 1, self.outer_step, loss.detach(), logs,
                         loss_scale=self.scales[p.name].scale if self.scaling else None)
        if hyper is not None:
            rec.hypergrad_norm = norm(hyper)
            self._hypergrad_cosine(p.name, hyper, params, rec)
            direct = [add(d, h) for d, h in zip(direct, hyper)]
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(direct, params)]
        self.apply_gradients(p, params, grads, loss, rec)
        return rec

    def _hypergrad_cosine(self, name: str, hyper: list[Tensor | None], params: list[Tensor],
                          rec: StepRecord) -> None:
        """``hypergrad_cosine`` in the step's logs: the cosine between this step's hypergradient
        and the problem's previous one (1: the same direction from batch to batch, about 0:
        noise). The previous one is a flat float32 copy, kept in the engine's state."""
        flat = torch.cat([(h if h is not None else torch.zeros_like(x)).detach().reshape(-1).float()
                          for h, x in zip(hyper, params)]) if params else None
        if flat is None:
            return
        prev = self.last_hypergrad.get(name)
        if prev is not None and prev.shape == flat.shape:
            denom = (prev.norm() * flat.norm()).clamp_min(1e-30)
            rec.logs["hypergrad_cosine"] = (prev @ flat) / denom
        self.last_hypergrad[name] = flat

    # -- inspection (check-hypergrad, tests) ------------------------------------------------
    def prefix(self, name: str) -> list[StepRecord]:
        """Take the steps the schedule runs before ``name``'s first step in an outer step,
        keeping their differentiable records, so :meth:`gradient` can follow."""
        i = self.schedule.index(name)
        self._forget()
        return [self._step_problem(self.problems[n]) for n in self.schedule[:i]]

    def gradient(self, name: str) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(loss, direct gradient, hypergradient) of problem ``name`` on its next batch, without
        stepping; the hypergradient is zeros where no path carries anything."""
        p = self.problems[name]
        batch = _to_device(p.next_batch(), self.device)
        try:
            loss, _, direct, hyper = self._gradients(p, batch)
        finally:
            self._forget()
        params = p.params()
        hyper = hyper if hyper is not None else [None] * len(params)
        return loss.detach(), fill(direct, params), fill(hyper, params)

    def apply_gradients(self, p: Problem, params: list[Tensor], grads: list[Tensor], loss: Tensor,
                        rec: StepRecord) -> None:
        """Check, clip and apply gradients (kept, as applied, where a push reads them), then
        count the step. ``grads`` are unscaled; ``rec.loss_scale`` is the scale the loss was
        multiplied by (None: not scaled), which then learns from this step."""
        gnorm = norm(grads) if grads else torch.zeros((), device=self.device)
        rec.grad_norm = gnorm
        finite = math.isfinite(float(gnorm + loss.detach()))  # one host sync, as bool() was
        if rec.loss_scale is not None:
            if finite:
                self.scales[p.name].clean()
            elif not self._overflow(p, loss, rec):
                self.nonfinite(p, loss, gnorm, rec)
        elif not finite:
            self.nonfinite(p, loss, gnorm, rec)
        if rec.skipped or p.optimizer is None or not params:
            p.step_count += 1
            return
        if p.grad_clip is not None:
            coef = torch.clamp(p.grad_clip / (gnorm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)
        if p.name in self.graph.applied:
            self.kept.keep_gradient(p.name, grads)
        for x, g in zip(params, grads):
            x.grad = g
        p.optimizer.step()
        for x in params:
            x.grad = None
        if p.scheduler is not None:
            p.scheduler.step()
        p.step_count += 1

    def _overflow(self, p: Problem, loss: Tensor, rec: StepRecord) -> bool:
        """A non-finite scaled gradient with a finite loss (on every process) is an fp16
        overflow: the step is skipped and counted, the scale backed off. False: not one (the
        loss itself is non-finite, or the scale is already 1), for the non-finite guard."""
        if not self.reducer.all(bool(torch.isfinite(loss.detach()))):
            return False
        if not self.scales[p.name].overflow():
            return False
        rec.skipped = True
        rec.grad_norm = rec.hypergrad_norm = None   # inf by construction: kept out of the means
        rec.logs["overflow/skipped"] = 1.0
        p.skipped += 1
        return True

    def nonfinite(self, p: Problem, loss: Tensor, gnorm: Tensor, rec: StepRecord) -> None:
        what = "loss" if not bool(torch.isfinite(loss.detach())) else (
            "hypergradient" if rec.hypergrad_norm is not None and not bool(torch.isfinite(rec.hypergrad_norm))
            else "gradient")
        if self.on_nonfinite == "skip":
            rec.skipped = True
            p.skipped += 1
            return
        raise NonFiniteError(f"non-finite {what} in problem '{p.name}' at its step "
                             f"{p.step_count + 1} (outer step {self.outer_step + 1}); set "
                             "trainer.on_nonfinite: skip to skip such steps instead")

    # -- hypergradients ---------------------------------------------------------------------
    def _lower_view(self, q: Problem, method: Method) -> LowerLevel:
        # e.g. finite differences: no autocast; under fp16 no push runs in fp16 (see above)
        precise = method.precise_loss or self.scaling

        def loss_fn() -> Tensor:
            with rng.replay(q.last_rng, self._cuda), q.replay():
                return self.evaluate(q, q.last_batch, autocast=not precise)[0]

        return LowerLevel(params=self.params_of(q), loss=loss_fn, lr=q.lr, reduce=self.reducer.mean,
                          optimizer=q.optimizer, step_gradient=self.kept.gradients.get(q.name))

    def _hypergradient(self, upper: Problem, adj: dict[str, list[Tensor]]) -> list[Tensor | None]:
        """Push the adjoints of the lower problems ``upper`` reads down every path back to
        ``upper``'s parameters; return the summed indirect gradient."""
        plan = self.graph.plans[upper.name]
        own = self.params_of(upper)
        hyper: list[Tensor | None] = [None] * len(own)
        for name in plan.order:
            v = adj.pop(name, None)
            if v is None:
                continue
            q = self.problems[name]
            method = plan.methods[name]
            reached = [self.problems[r] for r in plan.inputs[name]]
            inputs = [t for r in reached for t in self.params_of(r)]
            lower = self._lower_view(q, method)
            if method.keeps is Keep.UNROLLED:
                lower.trace, lower.retain_step = self.kept.take_window(q, reached)
            elif method.keeps is Keep.STEP_GRAPH:
                # the graph the lower's last step kept (none if the lower keeps no graph for
                # this push: the method then works at the current parameters); the last push
                # that reads it frees it
                kept, retain = self.kept.take_graph(name)
                if kept is not None:
                    lower.step_grads, lower.retain_step = kept.grads, retain
                    inputs = [t for r in reached for t in kept.reads.get(r.name, self.params_of(r))]
            contrib = method(v, lower, inputs)
            i = 0
            for r in reached:
                n = len(self.params_of(r))
                part = contrib[i:i + n]
                i += n
                if r.name == upper.name:
                    hyper = [add(h, c) for h, c in zip(hyper, part)]
                elif any(c is not None for c in part):
                    prev = adj.get(r.name)
                    part = fill(part, self.params_of(r))
                    adj[r.name] = part if prev is None else [a + b for a, b in zip(prev, part)]
        return hyper

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"outer_step": self.outer_step,
                 "problems": {n: p.state_dict() for n, p in self.problems.items()}}
        if self.kept.gradients:   # what outlives an outer step: the gradients SAMA reads
            state["kept_gradients"] = self.kept.state_dict()
        if self.scaling:
            state["loss_scale"] = {n: s.state_dict() for n, s in self.scales.items()}
        if self.last_hypergrad:
            state["last_hypergrad"] = dict(self.last_hypergrad)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.outer_step = int(state["outer_step"])
        for n, s in state["problems"].items():
            self.problems[n].load_state_dict(s)
        self.kept.load_state_dict(state.get("kept_gradients", {}))
        for n, s in state.get("loss_scale", {}).items():
            if n in self.scales:
                self.scales[n].load_state_dict(s)
        self.last_hypergrad = {n: t.to(self.device) for n, t in
                               state.get("last_hypergrad", {}).items() if n in self.problems}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
