"""What every benchmark shares: thread pinning, interleaved timing, agreement checks, results.

Timing rule (issue 6): contenders run side by side in one process, interleaved step by step
(A B C A B C ...), and each is summarised by the median of its repeated steps, so that load from
other processes on the shared cores hits every contender alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT.parent))  # the repo root: `problems` and `tests` import from here


def parser(doc: str, repeats: int, quick_repeats: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (make bench-quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed steps per contender (default {repeats}, quick {quick_repeats})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: stable on 2 shared cores)")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    p.set_defaults(_repeats=(repeats, quick_repeats))
    return p


def setup(args: argparse.Namespace) -> int:
    """Pin threads and the seed; return the number of timed repeats."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.repeats is not None:
        return args.repeats
    full, quick = args._repeats
    return quick if args.quick else full


def machine(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "nproc": os.cpu_count(),
            "cpu": cpu, "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": threads, "commit": commit,
            "load_avg": round(os.getloadavg()[0], 2)}


def cpu_flags() -> str:
    """What decides bf16's speed here: torch's capability and the bf16 / AMX flags present."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        flags = set()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{torch.backends.cpu.get_cpu_capability()}; " + (" ".join(shown) or "none of avx2/avx512/amx")


def describe_machine(threads: int) -> str:
    m = machine(threads)
    return (f"machine: {m['cpu']} ({m['cpu_flags']}), {m['nproc']} cores, {threads} thread(s), "
            f"torch {m['torch']}, load {m['load_avg']}, {m['date']}")


def interleave(contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
               ) -> dict[str, list[float]]:
    """Seconds per call of each contender, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ over lists of tensors (flattened together), in float64."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    fa = torch.cat([t.detach().double().flatten() for t in a])
    fb = torch.cat([t.detach().double().flatten() for t in b])
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-300))


def save(name: str, payload: dict, args: argparse.Namespace) -> None:
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = RESULTS / f"{name}{suffix}.json"
    payload = {"machine": machine(args.threads), "quick": bool(args.quick), **payload}
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(f"wrote {path.relative_to(ROOT.parent)}")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(out)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e5:
            return f"{x:.1e}"
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def grad_capture(optimizer: torch.optim.Optimizer) -> dict:
    """Copy the gradients an optimizer is about to apply (the assembled hypergradient), on
    every ``step``; returns the dict the last copy lands in (``box['grads']``)."""
    box: dict = {}

    def hook(opt, args, kwargs):
        box["grads"] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                        for g in opt.param_groups for p in g["params"]]

    optimizer.register_step_pre_hook(hook)
    return box


class Cycle:
    """Endless iteration over a fixed list of batches, from the first."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches
