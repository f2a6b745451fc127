"""``mlomae check-hypergrad``: every method's hypergradient against the exact unroll.

For each upper problem with a hypergradient path and for each method, the experiment is built
afresh from the same seed (same initial weights, same batches, same masks), the schedule runs
up to that problem's first step, and its gradient is computed without stepping. The reference
is the method that declares itself one (``Method.reference``: ``unroll``), which differentiates
through exactly the lower steps that were taken.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from typing import Any, Sequence

import torch

from .config import Config
from .hypergrad import DEFAULT, METHODS


class PeakMemory:
    """Peak memory growth during a block: CUDA's allocator statistics on a GPU, sampled
    resident set size on the CPU (coarse, about 1 ms resolution)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self._rss()
        self._max = self.base

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, self._rss()) - self.base


def with_method(cfg: Config, method: str) -> Config:
    """The same experiment with one method on every dependency (options kept where the
    experiment gave them for that method)."""
    data = copy.deepcopy(cfg.data)
    hg = data["hypergrad"]
    opts = {k: v for k, v in hg.items() if k != "method" and k not in METHODS} \
        if hg.get("method", DEFAULT) == method else {}
    blocks = {m: hg[m] for m in METHODS if isinstance(hg.get(m), dict)}
    data["hypergrad"] = {"method": method, **blocks, **opts}
    for d in data["dependencies"]:
        d["hypergrad"] = None
    return Config(data=data, file=cfg.file, overrides=cfg.overrides)


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts]) if ts else torch.zeros(0)


def check_hypergrad(cfg: Config, methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from .build import build, build_graph
    from .errors import ConfigError
    reference = next(name for name, cls in METHODS.items() if cls.reference)
    methods = list(methods or [m for m in METHODS if m != reference])
    for m in methods:
        if m not in METHODS:
            raise ConfigError("unknown hypergradient method", key="--methods", value=m,
                              hint="known: " + ", ".join(METHODS))
    uppers = list(build_graph(with_method(cfg, reference)).plans)
    if not uppers:
        raise ConfigError("no problem's gradient flows through a lower problem: nothing to check",
                          file=cfg.file, key="dependencies")
    rows: list[dict[str, Any]] = []
    for upper in uppers:
        ref = None
        for method in [reference] + [m for m in methods if m != reference]:
            built = build(with_method(cfg, method))
            eng = built.engine
            t0 = time.perf_counter()
            eng.prefix(upper)
            t1 = time.perf_counter()
            with PeakMemory(built.device) as mem:
                _, direct, hyper = eng.gradient(upper)
            t2 = time.perf_counter()
            total = _flat([d + h for d, h in zip(direct, hyper)])
            row = {"upper": upper, "method": method, "norm": float(total.norm()),
                   "lower_seconds": t1 - t0, "hypergrad_seconds": t2 - t1,
                   "peak_mb": mem.peak / 2**20}
            if ref is None:
                ref = total
            denom = float(ref.norm()) * float(total.norm())
            row["cosine"] = float(total @ ref) / denom if denom > 0 else float("nan")
            row["rel_error"] = float((total - ref).norm() / ref.norm()) if float(ref.norm()) > 0 else float("nan")
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], at: str | None = None) -> str:
    mw = max([12] + [len(r["method"]) + 1 for r in rows])
    head = f"{'upper':<12} {'method':<{mw}} {'cosine':>8} {'rel.err':>9} {'norm':>10} " \
           f"{'lower s':>8} {'hyper s':>8} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(x: float, spec: str) -> str:
            width = int(spec.split(".")[0])
            return "nan".rjust(width) if isinstance(x, float) and math.isnan(x) else format(x, spec)
        method = r["method"] + ("*" if r.get("configured") else "")
        lines.append(f"{r['upper']:<12} {method:<{mw}} {f(r['cosine'], '8.4f')} "
                     f"{f(r['rel_error'], '9.2e')} {f(r['norm'], '10.3e')} {r['lower_seconds']:8.3f} "
                     f"{r['hypergrad_seconds']:8.3f} {r['peak_mb']:8.1f}")
    ref = next(name for name, cls in METHODS.items() if cls.reference)
    lines.append(f"reference: {ref} (exact reverse mode through the lower steps taken)")
    if at:
        lines.append(f"at {at}")
    if any(r.get("configured") for r in rows):
        lines.append("*: the experiment's own hypergradient settings")
    return "\n".join(lines)


# -- at a given state: during training (trainer.check_hypergrad_every) and for a checkpoint ------

def reference_method() -> str:
    return next(name for name, cls in METHODS.items() if cls.reference)


def _compare(total: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine, relative error and norm ratio of ``total`` against ``ref`` (nan where undefined)."""
    r, t = float(ref.norm()), float(total.norm())
    nan = float("nan")
    return {"cosine": float(total @ ref) / (r * t) if r * t > 0 else nan,
            "rel_error": float((total - ref).norm()) / r if r > 0 else nan,
            "norm_ratio": t / r if r > 0 else nan}


class preserved_rng:
    """Restore torch's (CPU and CUDA), numpy's and Python's random states on exit."""

    def __enter__(self) -> "preserved_rng":
        from .checkpoint import rng_state
        self.state = rng_state()
        return self

    def __exit__(self, *exc: Any) -> None:
        from .checkpoint import set_rng_state
        set_rng_state(self.state)


def _engine(cfg: Config, data: Any = None, rank: int = 0, world: int = 1):
    """An engine for ``cfg``; with ``data`` (a run's ``DataBundle``) its datasets are shared
    rather than loaded again (the loaders are new, and take their positions from the state)."""
    from .build import (build, build_engine, build_models, build_problems, choose_attention,
                        resolve_precision, setup_process)
    if data is None:
        return build(cfg, rank=rank, world=world).engine
    device = setup_process(cfg, rank)
    models = build_models(cfg, device)
    problems = build_problems(cfg, models, data, device)
    engine = build_engine(cfg, problems, device, world, (),
                          resolve_precision(cfg["trainer"]["precision"], device)[0])
    choose_attention(cfg, engine)
    return engine


def _configured_label(engine, upper: str, cfg: Config) -> str:
    plan = engine.graph.plans.get(upper)
    if plan is None:   # no path carries anything (e.g. first_order everywhere)
        return str(cfg["hypergrad"].get("method", DEFAULT))
    return " + ".join(sorted({str(m) for m in plan.methods.values()}))


class StateCheck:
    """The hypergradient of each upper problem at a given engine state, by the experiment's own
    methods (``configured``), by the reference (``unroll``) and by any ``methods`` named.

    Each variant has an engine of its own, built once; :meth:`compare` loads the same state (a
    deep copy each time, so no optimizer state is shared) and the same random state into each,
    takes the lower steps the schedule runs before the upper problem's first step on the next
    batches (``Engine.prefix``) and its gradient, direct plus hypergradient, without stepping
    (``Engine.gradient``). So every variant sees the same K lower steps from the same
    parameters, optimizer states and loader positions, with the same masks and noise, and the
    reference differentiates exactly through those K steps (the parameters at the state are
    constants: nothing before it is differentiated). The configured variant's value is the one
    the training would apply in its next outer step. The engine the state came from is not
    touched, and the random states are restored afterwards.
    """

    def __init__(self, cfg: Config, methods: Sequence[str] = (), *, data: Any = None,
                 rank: int = 0, world: int = 1, measure_memory: bool = False):
        from .build import build_graph
        from .errors import ConfigError
        for m in methods:
            if m not in METHODS:
                raise ConfigError("unknown hypergradient method", key="--methods", value=m,
                                  hint="known: " + ", ".join(METHODS))
        self.reference = reference_method()
        ref_cfg = with_method(cfg, self.reference)
        self.uppers = list(build_graph(ref_cfg).plans)
        if not self.uppers:
            raise ConfigError("no problem's gradient flows through a lower problem: nothing to "
                              "check", file=cfg.file, key="dependencies")
        # (label, config, configured?); a method that is the experiment's own setting exactly
        # is the configured variant, not a second engine
        variants: list[tuple[str, Config, bool]] = [(self.reference, ref_cfg, False)]
        same = [m for m in methods if with_method(cfg, m).data == cfg.data]
        variants.append((same[0] if same else "configured", cfg, True))
        variants += [(m, with_method(cfg, m), False) for m in methods
                     if m != self.reference and m not in same]
        self.measure_memory = measure_memory
        self.cfg = cfg
        with preserved_rng():
            self.engines = [(label, _engine(c, data, rank, world), conf)
                            for label, c, conf in variants]

    def compare(self, state: dict[str, Any], rng: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows per upper problem and variant: the reference's first, then the configured one."""
        from .checkpoint import set_rng_state
        rows: list[dict[str, Any]] = []
        with preserved_rng():
            for upper in self.uppers:
                ref = None
                for label, eng, configured in self.engines:
                    t0 = time.perf_counter()
                    eng.load_state_dict(copy.deepcopy(state))
                    set_rng_state(rng)
                    t1 = time.perf_counter()
                    eng.prefix(upper)
                    t2 = time.perf_counter()
                    if self.measure_memory:
                        with PeakMemory(eng.device) as mem:
                            _, direct, hyper = eng.gradient(upper)
                    else:
                        _, direct, hyper = eng.gradient(upper)
                    total = _flat([d + h for d, h in zip(direct, hyper)])
                    t3 = time.perf_counter()
                    ref = total if ref is None else ref
                    name = _configured_label(eng, upper, self.cfg) if configured else label
                    rows.append({"upper": upper, "method": name, "label": label,
                                 "configured": configured, "reference": eng is self.engines[0][1],
                                 "norm": float(total.norm()), **_compare(total, ref),
                                 "lower_seconds": t2 - t1, "hypergrad_seconds": t3 - t2,
                                 "seconds": t3 - t0,
                                 "peak_mb": mem.peak / 2**20 if self.measure_memory else float("nan")})
        return rows


def load_run_checkpoint(run_dir: str | os.PathLike, step: int | None = None,
                        overrides: Sequence[str] = ()) -> tuple[Config, Any, dict[str, Any]]:
    """A run directory's ``config.yaml`` (with ``overrides``) and its latest intact checkpoint,
    or the one of outer step ``step``: (config, checkpoint path, state)."""
    from pathlib import Path

    from . import checkpoint
    from .config import load
    from .errors import ConfigError
    rd = Path(run_dir)
    cfg_file = rd / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError("not a run directory (no config.yaml)", key="RUN_DIR", value=str(rd))
    found = checkpoint.list_checkpoints(rd / "checkpoints")
    steps = {int(checkpoint.PATTERN.fullmatch(p.name).group(1)): p for p in found}
    if step is None:
        latest = checkpoint.load_latest(rd / "checkpoints")
        if latest is None:
            raise ConfigError("no usable checkpoint in the run directory", key="RUN_DIR",
                              value=str(rd))
        path, state = latest
    else:
        if step not in steps:
            raise ConfigError("no checkpoint of this outer step", key="--step", value=step,
                              hint="available: " + (", ".join(map(str, sorted(steps))) or "none"))
        path = steps[step]
        problem = checkpoint.verify(path)
        if problem is not None:
            raise ConfigError(f"checkpoint {path} is unusable: {problem}", key="--step", value=step)
        state = checkpoint.load(path)
    return load(str(cfg_file), list(overrides)), path, state


def check_checkpoint(run_dir: str | os.PathLike, step: int | None = None,
                     methods: Sequence[str] | None = None, overrides: Sequence[str] = ()
                     ) -> tuple[int, list[dict[str, Any]]]:
    """:class:`StateCheck` at a run's latest intact checkpoint (or the one of outer step
    ``step``), with the run's ``config.yaml``: (outer step, rows). ``methods`` None: all."""
    from .errors import ConfigError
    cfg, path, state = load_run_checkpoint(run_dir, step, overrides)
    ref = reference_method()
    methods = [m for m in METHODS if m != ref] if methods is None else list(methods)
    check = StateCheck(cfg, methods, measure_memory=True)
    try:   # a checkpoint of another shape (overrides that change a model) fails here, not later
        check.engines[0][1].load_state_dict(copy.deepcopy(state["engine"]))
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {path.name} does not fit the experiment: "
                          f"{str(e).splitlines()[0]}", key="RUN_DIR", value=str(run_dir)) from None
    return int(state["engine"]["outer_step"]), check.compare(state["engine"], state["rng"])
