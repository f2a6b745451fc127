"""Question 2: the cost of one outer step of the 3-level MLO-MAE graph per hypergradient method,
in plain random-mask pretraining steps, broken down by phase.

The graph is the project's (experiments/mlomae_published.yaml): masker over the MAE's patch
embeddings with its input detached, head (BatchNorm, linear) on mean-pooled features, steps
2 / 1 / 1; question 3b uses the
official wiring instead (input not detached, class token) because Betty runs that one.
One outer step (cycle) = 2 pretraining steps + 1 fine-tune step + 1 mask step. Phases:
  lower steps     the pretraining and fine-tune steps (differentiable ones for unroll)
  hypergradient   time inside the hypergradient methods (both pushes: head, then MAE)
  upper step      the rest of the mask step: its loss, the adjoints, the masker update
Cost per pretraining step = cycle / 2 (DESIGN.md's convention); the goal for darts is <= 3.5.
darts and first_order run fused attention; neumann, cg and unroll need the plain kernel (the
CPU's fused one has no double backward), and so do their lower steps.

darts_exact_head is darts with ``exact: true`` on the mask -> finetune edge alone (the push
through the head by double backward; the MAE edge keeps finite differences and fused attention).

Before timing, every method's masker hypergradient on the same state is compared with unroll's
(exact through the recorded steps) and darts's: approximations differ by design (scale
included: DARTS takes H⁻¹ ≈ I where two AdamW steps of lr 1.5e-4 move θ very little), the
numbers say by how much.

    .venv/bin/python benchmarks/mae_methods.py [--quick] [--methods darts,cg]
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

import common
import mae_graph as G
from mlomae import hypergrad

# name: (method, options, options of the mask -> finetune edge alone)
METHODS = {"darts": ("darts", {"alpha": 0.01}, None),
           "darts_exact_head": ("darts", {"alpha": 0.01}, {"exact": True}),
           "darts_unroll_head": ("darts", {"alpha": 0.01}, {"method": "unroll"}),
           "first_order": ("first_order", {}, None), "neumann": ("neumann", {"iters": 5}, None),
           "cg": ("cg", {"iters": 5}, None), "unroll": ("unroll", {}, None)}


def build(name: str, sizes: G.Sizes, state: dict, batches: dict):
    method, opts, head = METHODS[name]
    return G.build_mlomae(method, sizes, state, batches, options=opts, head_edge=head)


class PhaseTimer:
    """Wraps the pushes of every hypergradient method (``Method.__call__``), to time them."""

    def __init__(self):
        self.seconds = 0.0
        self.originals = {cls: cls.__call__ for cls in hypergrad.METHODS.values()}

    def __enter__(self):
        for cls, fn in self.originals.items():
            cls.__call__ = self._wrap(fn)
        return self

    def __exit__(self, *exc):
        for cls, fn in self.originals.items():
            cls.__call__ = fn

    def _wrap(self, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def cosine(a, b) -> float:
    fa = torch.cat([t.double().flatten() for t in a])
    fb = torch.cat([t.double().flatten() for t in b])
    return float(torch.nn.functional.cosine_similarity(fa, fb, dim=0))


def hypergradient(method: str, sizes: G.Sizes, state: dict, batches: dict):
    eng = build(method, sizes, state, batches)
    eng.prefix("mask")
    return eng.gradient("mask")[2]


def main() -> None:
    p = common.parser(__doc__, repeats=8, quick_repeats=3)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    repeats = common.setup(args)
    methods = args.methods.split(",")
    # the project's wiring (experiments/mlomae_published.yaml): masker input detached, head with
    # BatchNorm on mean-pooled features
    sizes = G.with_sizes(detach_masker_input=True, pool="mean", head_norm=True)
    state, batches = G.initial_state(sizes), G.data(sizes)
    print(f"mae_methods: MAE embed {sizes.embed} depth {sizes.depth}, batch {sizes.batch}, "
          f"steps {sizes.pretrain_steps}/{sizes.finetune_steps}/1; threads {args.threads}, "
          f"{repeats} timed cycles per method")

    # agreement (information: the methods approximate different things)
    hg = {m: hypergradient(m, sizes, state, batches) for m in methods if m != "first_order"}
    agree = {m: {"vs_unroll": common.rel(g, hg["unroll"]) if "unroll" in hg else None,
                 "vs_darts": common.rel(g, hg["darts"]) if "darts" in hg else None,
                 "cos_unroll": cosine(g, hg["unroll"]) if "unroll" in hg else None}
             for m, g in hg.items()}
    def fmt(x, spec):
        return "–" if x is None else format(x, spec)

    for m, a in agree.items():
        print(f"  {m}: masker hypergradient rel. diff vs unroll {fmt(a['vs_unroll'], '.2e')}, "
              f"vs darts {fmt(a['vs_darts'], '.2e')}, cosine vs unroll {fmt(a['cos_unroll'], '.3f')}")

    engines = {m: build(m, sizes, state, batches) for m in methods}
    plain = G.PlainStep(sizes, state, batches["pretrain"])
    phases = {m: defaultdict(list) for m in methods}

    def cycle(m):
        def run():
            with PhaseTimer() as pt:
                t0 = time.perf_counter()
                records = engines[m].step()
                total = time.perf_counter() - t0
            lower = sum(r.seconds for r in records if r.problem != "mask")
            phases[m]["lower"].append(lower)
            phases[m]["hypergradient"].append(pt.seconds)
            phases[m]["upper"].append(total - lower - pt.seconds)
        return run

    contenders = {"plain": plain, **{m: cycle(m) for m in methods}}
    times = common.interleave(contenders, repeats)
    for m in methods:  # drop the warm-up cycle's phases
        for k in phases[m]:
            phases[m][k] = phases[m][k][1:]
    med = {k: common.median(v) for k, v in times.items()}
    unit = med["plain"]
    rows, out = [], {}
    for m in methods:
        ph = {k: common.median(v) / unit for k, v in phases[m].items()}
        per_pre = med[m] / sizes.pretrain_steps / unit
        out[m] = {"cycle_s": med[m], "cycle_plain_steps": med[m] / unit,
                  "per_pretrain_step": per_pre, "phases_plain_steps": ph, "agreement": agree.get(m)}
        rows.append([m, 1e3 * med[m], med[m] / unit, per_pre, ph["lower"], ph["hypergradient"],
                     ph["upper"]])
    print(f"plain random-mask pretraining step: {1e3 * unit:.1f} ms (median)")
    print(common.table(rows, ["method", "cycle ms", "cycle / plain", "per pretraining step",
                              "lower steps", "hypergradient", "upper step"]))
    if "darts" in out:
        print(f"HEADLINE 2: darts costs {out['darts']['per_pretrain_step']:.2f} plain steps per "
              f"pretraining step ({out['darts']['cycle_plain_steps']:.2f} per cycle; goal <= 3.5)")
    common.save("mae_methods", {"plain_step_s": unit, "methods": out, "times_s": times,
                                "sizes": sizes.__dict__}, args)


if __name__ == "__main__":
    main()
