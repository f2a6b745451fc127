"""What the runner hangs on the engine: metrics, progress, periodic validation, checkpoints."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from .engine import Callback, Engine, StepRecord
from .tracking import RunDir, Tracker


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean()) if v.numel() else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


class Metrics(Callback):
    """Every ``log_every`` outer steps: the mean of each problem's losses, gradient and
    hypergradient norms, logs and step times since the last record, written to
    ``metrics.jsonl`` and queued for MLflow. Tensors become numbers only here."""

    def __init__(self, run_dir: RunDir | None, tracker: Tracker | None, log_every: int, total: int):
        self.run_dir, self.tracker = run_dir, tracker
        self.log_every, self.total = max(1, log_every), total
        self.acc: dict[str, list] = defaultdict(list)
        self.last: dict[str, float] = {}
        self.t_last = time.perf_counter()
        self.steps_since = 0
        self.listeners: list[Callable[[dict], None]] = []

    def state_dict(self) -> dict[str, Any]:
        """What has been accumulated since the last record, as numbers (for exact resume)."""
        return {"acc": {k: [x for x in (_scalar(v) for v in vals) if x is not None]
                        for k, vals in self.acc.items()},
                "steps_since": self.steps_since, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = defaultdict(list, {k: list(v) for k, v in state["acc"].items()})
        self.steps_since = int(state["steps_since"])
        self.last = dict(state.get("last", {}))

    def on_problem_step(self, engine: Engine, r: StepRecord) -> None:
        p = r.problem
        self.acc[f"{p}/loss"].append(r.loss)
        if r.grad_norm is not None:
            self.acc[f"{p}/grad_norm"].append(r.grad_norm)
        if r.hypergrad_norm is not None:
            self.acc[f"{p}/hypergrad_norm"].append(r.hypergrad_norm)
        self.acc[f"{p}/seconds"].append(r.seconds)
        for k, v in r.logs.items():
            self.acc[f"{p}/{k}"].append(v)
        if r.skipped:
            self.acc[f"{p}/skipped"].append(1.0)

    def on_outer_step(self, engine: Engine, step: int, records: list[StepRecord]) -> None:
        self.steps_since += 1
        if step % self.log_every and step != self.total:
            return
        now = time.perf_counter()
        rec: dict[str, Any] = {"step": step, "time": time.time()}
        for k, vals in self.acc.items():
            nums = [x for x in (_scalar(v) for v in vals) if x is not None]
            if nums:
                rec[k] = sum(nums) if k.endswith("/skipped") else sum(nums) / len(nums)
        for name, p in engine.problems.items():
            if p.optimizer is not None:
                rec[f"{name}/lr"] = p.lr
        rec["outer_step_seconds"] = (now - self.t_last) / max(1, self.steps_since)
        self.acc.clear()
        self.t_last, self.steps_since = now, 0
        self.emit(rec)

    def emit(self, rec: dict[str, Any]) -> None:
        self.last.update({k: v for k, v in rec.items() if k not in ("time",)})
        if self.run_dir is not None:
            line = self.run_dir.lines
            self.run_dir.append(rec)
            if self.tracker is not None:
                self.tracker.log(line, rec)
        for fn in self.listeners:
            fn(rec)


class Progress(Callback):
    """A progress bar with per-problem losses on a terminal; plain lines otherwise (CI)."""

    def __init__(self, total: int, metrics: Metrics, stream=None, every_seconds: float = 10.0):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every_seconds
        self.t0 = self.t_print = time.perf_counter()
        self.start_step = 0
        self.latest: dict[str, float] = {}
        metrics.listeners.append(self._record)

    def on_run_start(self, engine: Engine) -> None:
        self.t0 = time.perf_counter()
        self.start_step = engine.outer_step

    def _record(self, rec: dict) -> None:
        # records without losses (validation, hypergradient checks) keep the last ones shown
        self.latest = {k: v for k, v in rec.items() if k.endswith("/loss")} or self.latest
        if not self.tty:
            self._line(rec["step"], force=rec["step"] == self.total)

    def on_outer_step(self, engine: Engine, step: int, records: list[StepRecord]) -> None:
        if self.tty:
            now = time.perf_counter()
            if now - self.t_print > 0.1 or step == self.total:
                self.t_print = now
                done = step / self.total
                bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
                rate = (step - self.start_step) / max(1e-9, now - self.t0)
                losses = " ".join(f"{k[:-5]}={v:.4g}" for k, v in self.latest.items())
                self.stream.write(f"\r[{bar}] {step}/{self.total} {rate:.2f} it/s {losses}\033[K")
                self.stream.flush()

    def _line(self, step: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.t_print < self.every:
            return
        self.t_print = now
        rate = (step - self.start_step) / max(1e-9, now - self.t0)
        losses = " ".join(f"{k[:-5]}={v:.4g}" for k, v in self.latest.items())
        self.stream.write(f"step {step}/{self.total} ({rate:.2f} it/s) {losses}\n")
        self.stream.flush()

    def on_run_end(self, engine: Engine) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Periodic(Callback):
    """Call ``fn(engine, step)`` every ``every`` outer steps (and after the last one)."""

    def __init__(self, every: int, total: int, fn: Callable[[Engine, int], None], at_end: bool = True):
        self.every, self.total, self.fn, self.at_end = every, total, fn, at_end

    def on_outer_step(self, engine: Engine, step: int, records: list[StepRecord]) -> None:
        if (self.every and step % self.every == 0) or (self.at_end and step == self.total):
            self.fn(engine, step)


class HypergradCheck(Callback):
    """Every ``every`` outer steps: for each upper problem with a hypergradient path, its
    gradient by the experiment's methods against the exact unroll through the same lower steps
    (:class:`mlomae.check.StateCheck`, at the state after this outer step), logged as
    ``hypercheck/<upper>/cosine``, ``rel_error``, ``norm_ratio`` and ``seconds`` (the check's
    wall time), and ``hypercheck/<upper>/<method>/...`` for each of ``methods``.

    The check runs on engines of its own, loaded with a copy of the state and of the random
    states, which are restored afterwards: the training goes on exactly as without it. Its time
    is left out of the next ``outer_step_seconds``. The engines are built when the run starts
    (an experiment the reference cannot unroll fails there)."""

    def __init__(self, built: Any, metrics: Metrics, every: int, methods: list[str] | None = None,
                 rank: int = 0, world: int = 1):
        self.built, self.metrics, self.every = built, metrics, every
        self.methods, self.rank, self.world = list(methods or []), rank, world
        self.check = None

    def on_run_start(self, engine: Engine) -> None:
        from .check import StateCheck
        self.check = StateCheck(self.built.cfg, self.methods, data=self.built.data,
                                rank=self.rank, world=self.world)

    def on_outer_step(self, engine: Engine, step: int, records: list[StepRecord]) -> None:
        if step % self.every:
            return
        from .checkpoint import rng_state
        t0 = time.perf_counter()
        rows = self.check.compare(engine.state_dict(), rng_state())
        rec: dict[str, Any] = {"step": step, "time": time.time()}
        for r in rows:
            if r["reference"]:
                continue
            base = f"hypercheck/{r['upper']}/" + ("" if r["configured"] else f"{r['label']}/")
            for k in ("cosine", "rel_error", "norm_ratio"):
                rec[base + k] = r[k]
        for upper in self.check.uppers:
            rec[f"hypercheck/{upper}/seconds"] = sum(r["seconds"] for r in rows if r["upper"] == upper)
        self.metrics.t_last += time.perf_counter() - t0   # training pace without the check
        self.metrics.emit(rec)
