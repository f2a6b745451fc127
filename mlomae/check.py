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


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'upper':<12} {'method':<12} {'cosine':>8} {'rel.err':>9} {'norm':>10} " \
           f"{'lower s':>8} {'hyper s':>8} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(x: float, spec: str) -> str:
            width = int(spec.split(".")[0])
            return "nan".rjust(width) if isinstance(x, float) and math.isnan(x) else format(x, spec)
        lines.append(f"{r['upper']:<12} {r['method']:<12} {f(r['cosine'], '8.4f')} "
                     f"{f(r['rel_error'], '9.2e')} {f(r['norm'], '10.3e')} {r['lower_seconds']:8.3f} "
                     f"{r['hypergrad_seconds']:8.3f} {r['peak_mb']:8.1f}")
    ref = next(name for name, cls in METHODS.items() if cls.reference)
    lines.append(f"reference: {ref} (exact reverse mode through the lower steps taken)")
    return "\n".join(lines)
