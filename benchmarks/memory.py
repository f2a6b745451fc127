"""Question 4: peak memory of one outer step against K.

  mlp   question 3a's problem with K lower SGD steps per outer step (K = 1, 5, 10, 20) and, for
        neumann and cg, K iterations: unroll keeps K steps of graph (grows with K); darts,
        neumann and cg keep one (flat: goal within 10%)
  mae   the MLO-MAE graph of questions 2 and 3b, every method, Betty's DARTS beside it

How: each configuration runs in a fresh process with glibc's mmap threshold pinned to 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every tensor above that is its own mapping, returned to the
system when freed; the process takes one warm-up outer step (optimizer state, caches), resets its
resident-set high-water mark (``/proc/self/clear_refs``), takes one more outer step and reports
the high-water mark minus the resident set before it: the step's own peak, in MiB (median of
three such steps).
Before measuring, each child also saves its hypergradient, and the parent prints how far neumann
and cg are from unroll at each K (the answers differ by design; the point is that all compute).

    benchmarks/.venv-bench/bin/python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import common

KS = (1, 5, 10, 20)
MLP_METHODS = ("unroll", "darts", "neumann", "cg")
MAE_METHODS = ("darts", "darts_exact_head", "first_order", "neumann", "cg", "unroll", "betty",
               "plain")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_of(step) -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")     # reset VmHWM to the current RSS
    before = _status("VmRSS")
    step()
    return _status("VmHWM") - before


def child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    grads = None
    if spec["model"] == "mlp":
        import peers_mlp as P
        P.INNER_STEPS, P.K = spec["K"], spec["K"]
        train, val, state, s0 = P.task()
        c = P.Mlomae(spec["method"], train, val, state, s0)
        c.step()
        step, grads = c.step, c.box
    else:
        import mae_graph as G
        s = G.Sizes()
        state, batches = G.initial_state(s), G.data(s)
        m = spec["method"]
        if m == "plain":
            step = G.PlainStep(s, state, batches["pretrain"])
        elif m == "betty":
            step = G.BettyGraph(s, state, batches).step
        else:
            opts = {"neumann": {"iters": 5}, "cg": {"iters": 5}}.get(m, {})
            head = {"exact": True} if m == "darts_exact_head" else None
            step = G.build_mlomae(m.replace("_exact_head", ""), s, state, batches, options=opts,
                                  head_edge=head).step
        step()
    peaks = sorted(_peak_of(step) for _ in range(3))
    peak = peaks[1]   # median of three steps: page-level noise is a few hundred KiB
    if grads is not None and spec.get("save"):
        torch.save(grads["grads"], spec["save"])
    print(json.dumps({"peak_bytes": peak}))


def run_child(spec: dict) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--child", json.dumps(spec)],
                         env=env, capture_output=True, text=True, cwd=common.ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    p = common.parser(__doc__, repeats=1, quick_repeats=1)
    args = p.parse_args()
    common.setup(args)
    ks = KS if not args.quick else (5, 20)
    mlp_methods = MLP_METHODS if not args.quick else ("unroll", "neumann", "cg")
    mae_methods = MAE_METHODS if not args.quick else ()
    mib = 2.0 ** 20
    print(f"memory: one outer step's peak resident memory over the resident set before it; "
          f"K = {ks}; threads {args.threads}")
    mlp, agree = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for K in ks:
            files = {}
            for m in mlp_methods:
                files[m] = os.path.join(tmp, f"{m}-{K}.pt")
                mlp.setdefault(m, {})[K] = run_child({"model": "mlp", "method": m, "K": K,
                                                      "threads": args.threads, "save": files[m]})
            ref = torch.load(files["unroll"])
            agree[K] = {m: common.rel(torch.load(files[m]), ref) for m in mlp_methods}
            print(f"  K={K}: " + ", ".join(f"{m} {mlp[m][K] / mib:.1f} MiB" for m in mlp_methods)
                  + "; hypergradient rel. diff vs unroll: "
                  + ", ".join(f"{m} {agree[K][m]:.2f}" for m in mlp_methods if m != "unroll"),
                  flush=True)
    rows = [[m] + [mlp[m][K] / mib for K in ks] + [mlp[m][ks[-1]] / mlp[m][ks[0]]]
            for m in mlp_methods]
    print(common.table(rows, ["method (MLP)"] + [f"K={K} MiB" for K in ks]
                       + [f"K={ks[-1]} / K={ks[0]}"]))
    mae = {}
    for m in mae_methods:
        mae[m] = run_child({"model": "mae", "method": m, "threads": args.threads})
        print(f"  MAE graph {m}: {mae[m] / mib:.0f} MiB", flush=True)
    if mae:
        rows = [[m, mae[m] / mib, mae[m] / mae["plain"]] for m in mae_methods]
        print(common.table(rows, ["MLO-MAE cycle (MAE graph)", "peak MiB", "× plain step"]))
    flat = {m: max(mlp[m].values()) / min(mlp[m].values()) for m in ("neumann", "cg")}
    print("HEADLINE 4: peak memory K=%d / K=%d: unroll %.2fx; max / min over K: neumann %.2fx, "
          "cg %.2fx (goal: within 1.10)" % (ks[-1], ks[0], mlp["unroll"][ks[-1]] / mlp["unroll"][ks[0]],
                                            flat["neumann"], flat["cg"]))
    common.save("memory", {"mlp_peak_bytes": mlp, "mae_peak_bytes": mae, "ks": list(ks),
                           "mlp_rel_diff_vs_unroll": agree}, args)


if __name__ == "__main__":
    main()
