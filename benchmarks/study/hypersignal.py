"""How much of the masker's hypergradient is signal? At a run's checkpoint, the hypergradient of
one problem (``mask`` by default) on many batches, and how much of it repeats from batch to
batch:

    python benchmarks/study/hypersignal.py benchmarks/study/runs-masking/mlomae_repaired-s0 \\
        [--step OUTER_STEP] [--batches 64] [--problem mask] [--methods unroll] [--save]

From the checkpoint's state the schedule runs as in training (the lower problems step: the
pretraining steps and the head's step of each outer step), and before each of the upper
problem's steps its hypergradient is taken without stepping it (``Engine.prefix`` then
``Engine.gradient``, as ``mlomae check-hypergrad`` does), so the masker stays where the
checkpoint left it while the MAE moves on as it would have. With g_1 .. g_N the hypergradients
(flattened over the masker's parameters):

- *signal share* rho = mean_{i != j} g_i . g_j / mean_i |g_i|^2, an unbiased estimate of
  |E g|^2 / E |g|^2: 1 when every batch gives the same vector, 0 for pure noise;
- *batches to half signal* (1 - rho) / rho: how many batches a mean needs before its signal
  part is as large as its noise part;
- the mean pairwise and the mean successive cosine (the latter is what the runs log as
  ``mask/hypergrad_cosine``), and the cosine between the means of the first and the second half
  of the batches (split-half agreement of the mean direction);
- *top-direction share* lambda_1 / sum_k lambda_k, the eigenvalues of the N x N Gram matrix
  g_i . g_j: the share of the squared norm along the one direction that carries most of it.
  Near 1 beside a signal share near 0 means one axis whose sign flips from batch to batch: the
  means of any two sets of batches then lie on that axis too, so their cosine is near +-1
  whatever the signal (the split-half cosine tells nothing there);
- *top-batch share* max_i |g_i|^2 / sum_i |g_i|^2: near 1/N when the batches weigh alike, near 1
  when one batch carries the squared norm.

``--save`` also keeps every batch's norm, the N x N cosine matrix (``per_batch``) and, for the
top direction, the share of its squared norm in each of the problem's parameter tensors
(``top_direction``): which part of the masker the batch-to-batch axis moves.

``--methods unroll`` takes the exact hypergradient (through the same K pretraining steps) at each
of the same states beside the run's own method: its signal share, and against the run's method
the mean per-batch cosine and the cosine of the two means (is the mean direction the run's
method follows the exact one, only noisier, or another?).

Only the training splits are read (``pretrain``, ``finetune`` and ``mask``, through the problems'
own loaders); test is not. ``--save`` keeps the numbers, what each label stands for
(``variants``: a method, or the overrides given by ``--also``) and the git commit that measured
them beside the study's records (results/EXPERIMENT/RUN-signal-sSTEP[-TAG].json, EXPERIMENT read
from the run's config).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent


def signal_stats(g: torch.Tensor) -> dict[str, float]:
    """The statistics above for the rows of ``g`` (N x D, N >= 2), in float64."""
    g = g.double()
    n = g.shape[0]
    if n < 2:
        raise ValueError("signal_stats needs at least two hypergradients")
    dots = g @ g.T
    sq = dots.diagonal()
    cross = (dots.sum() - sq.sum()) / (n * (n - 1))
    rho = float(cross / sq.mean())
    norms = sq.sqrt().clamp_min(1e-300)
    cos = dots / (norms[:, None] * norms[None, :])
    pairwise = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    successive = float(cos.diagonal(1).mean())
    a, b = g[: n // 2].mean(0), g[n // 2:].mean(0)
    half = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
    return {"batches": n, "mean_norm": float(norms.mean()), "signal_share": rho,
            "batches_to_half_signal": (1 - rho) / rho if rho > 0 else math.inf,
            "pairwise_cosine": pairwise, "successive_cosine": successive,
            "split_half_cosine": half, "top_batch_share": float(sq.max() / sq.sum()),
            "top_direction_share": float(torch.linalg.eigvalsh(dots)[-1] / sq.sum())}


def top_direction(g: torch.Tensor, names: list[tuple[str, int]]) -> dict[str, float]:
    """Where the rows' top direction (the first right singular vector of ``g``) lives: the share
    of its squared norm in each parameter tensor, ``names`` = (name, numel) in ``g``'s column
    order, largest first."""
    if sum(k for _, k in names) != g.shape[1]:
        raise ValueError(f"the parameters' sizes add up to {sum(k for _, k in names)}, "
                         f"the hypergradients have {g.shape[1]} entries")
    u = torch.linalg.svd(g.double(), full_matrices=False).Vh[0]
    shares, at = {}, 0
    for name, k in names:
        shares[name] = float(u[at:at + k].square().sum())
        at += k
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def per_batch(g: torch.Tensor) -> dict[str, list]:
    """Every row's norm and the cosine matrix of the rows (4 significant digits), for the record."""
    g = g.double()
    norms = g.norm(dim=1)
    cos = (g @ g.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    return {"norms": [float(f"{x:.4g}") for x in norms.tolist()],
            "cosines": [[float(f"{x:.4g}") for x in row] for row in cos.tolist()]}


def hypergradients(run_dir: Path, step: int | None, problem: str, batches: int,
                   methods: list[str], threads: int, also: dict[str, list[str]] | None = None
                   ) -> tuple[int, dict[str, torch.Tensor], float, list[tuple[str, int]]]:
    """(outer step of the checkpoint, {label: N x D hypergradients}, pretraining lr there,
    the problem's parameters as (name, numel) in the hypergradients' column order).

    ``configured`` is the run's own method; every other method (``mlomae.check.with_method``:
    that method on every dependency) is taken at the same N states, each from the same
    parameters, optimizer states, loader positions and random state as the configured one, so
    their hypergradients differ by the method alone. ``also`` adds variants by label: the run's
    config with those overrides (e.g. one method on one edge only)."""
    import copy
    from mlomae.build import build
    from mlomae.check import _engine, _flat, load_run_checkpoint, preserved_rng, with_method
    from mlomae.checkpoint import rng_state, set_rng_state
    from mlomae.config import load
    from mlomae.errors import ConfigError
    from mlomae.hypergrad import METHODS
    torch.set_num_threads(threads)
    for m in methods:
        if m not in METHODS:
            raise ConfigError("unknown hypergradient method", key="--methods", value=m,
                              hint="known: " + ", ".join(METHODS))
    cfg, _, state = load_run_checkpoint(run_dir, step, ["evaluation=[]"])
    with preserved_rng():
        built = build(cfg)
        others = {m: _engine(with_method(cfg, m), built.data) for m in methods}
        for label, ovs in (also or {}).items():
            others[label] = _engine(load(str(run_dir / "config.yaml"), ["evaluation=[]", *ovs]),
                                    built.data)
    driver = built.engine
    if problem not in driver.problems:
        raise ConfigError("no such problem", key="--problem", value=problem,
                          hint="problems: " + ", ".join(driver.problems))
    driver.load_state_dict(state["engine"])
    set_rng_state(state["rng"])
    lr = driver.problems["pretrain"].lr if "pretrain" in driver.problems else float("nan")
    rows: dict[str, list[torch.Tensor]] = {"configured": [], **{m: [] for m in others}}
    for _ in range(batches):
        if others:
            here, rng = copy.deepcopy(driver.state_dict()), rng_state()
            for m, eng in others.items():
                eng.load_state_dict(copy.deepcopy(here))
                set_rng_state(rng)
                eng.prefix(problem)
                rows[m].append(_flat(eng.gradient(problem)[2]))
            set_rng_state(rng)
        driver.prefix(problem)   # the lower problems step; the masker does not
        rows["configured"].append(_flat(driver.gradient(problem)[2]))
    g = {k: torch.stack(v) for k, v in rows.items()}
    if not bool(g["configured"].any()):
        raise ValueError(f"{run_dir}: every hypergradient of {problem!r} is zero at outer step "
                         f"{state['engine']['outer_step']} (inside the masker's random warm-up, or "
                         f"a pretraining lr of {lr:g}?): take a later --step")
    names = [(n, q.numel()) for n, q in driver.problems[problem].named_params()]
    return int(state["engine"]["outer_step"]), g, float(lr), names


def _off_diagonal_mean(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return (m.sum() - m.diagonal().sum()) / (n * (n - 1))


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Two methods' hypergradients on the same N states (rows): the mean per-batch cosine, the
    cosine of their means over the N batches, and the *signal cosine*, the cosine of the two
    expected hypergradients with the noise taken out: E a . E b / (|E a| |E b|), each product
    estimated without bias by the mean of a_i . b_j over i != j (different batches), so the
    batch noise does not shrink it as it shrinks the cosine of the means (noisy: it can leave
    [-1, 1] when the signal shares are small; nan when one of them is not positive)."""
    a, b = a.double(), b.double()
    per = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    ma, mb = a.mean(0), b.mean(0)
    ab, aa, bb = (_off_diagonal_mean(x @ y.T) for x, y in ((a, b), (a, a), (b, b)))
    signal = float(ab / (aa * bb).sqrt()) if aa > 0 and bb > 0 else math.nan
    return {"batch_cosine": float(per.mean()),
            "mean_cosine": float(ma @ mb / (ma.norm() * mb.norm()).clamp_min(1e-300)),
            "signal_cosine": signal}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="a checkpoint's outer step (default: the latest)")
    ap.add_argument("--batches", type=int, default=64)
    ap.add_argument("--problem", default="mask")
    ap.add_argument("--methods", default="", help="also these methods at the same states, "
                    "e.g. unroll (comma-separated)")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=OVERRIDE[;OVERRIDE]",
                    help="also the run's config with these overrides, e.g. "
                         "'sama_pretrain=hypergrad.method=sama;dependencies=[...]' (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", action="store_true", help="keep the numbers beside the study's records")
    ap.add_argument("--tag", default="", help="with --save: RUN-signal-sSTEP-TAG.json, so a "
                    "measurement by other code or settings keeps the earlier one")
    args = ap.parse_args()
    from mlomae.build import source_commit
    from mlomae.errors import MlomaeError
    t0 = time.time()
    methods = [m for m in args.methods.split(",") if m]
    also = {}
    for item in args.also:
        label, _, ovs = item.partition("=")
        if not label or not ovs:
            print(f"error: --also {item!r}: expected LABEL=OVERRIDE[;OVERRIDE]", file=sys.stderr)
            return 2
        also[label] = ovs.split(";")
    try:
        step, g, lr, names = hypergradients(args.run_dir, args.step, args.problem, args.batches,
                                     methods, args.threads, also)
        stats = {k: signal_stats(v) for k, v in g.items()}
    except (MlomaeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"run": args.run_dir.name, "outer_step": step, "problem": args.problem,
           "pretrain_lr": lr, "signal": stats,
           "per_batch": {k: per_batch(v) for k, v in g.items()},
           "top_direction": {k: top_direction(v, names) for k, v in g.items()},
           "agreement": {f"{a} / {b}": agreement(g[a], g[b])
                         for i, a in enumerate(g) for b in list(g)[i + 1:]},
           "variants": {**{m: f"hypergrad.method={m} on every dependency" for m in methods},
                        **{label: ovs for label, ovs in also.items()}},
           "seconds": time.time() - t0, "code": source_commit()}
    print(f"{out['run']}, outer step {step}, problem {args.problem}, pretraining lr {lr:.3g}, "
          f"{args.batches} batches")
    keys = list(stats["configured"])[1:]
    print("| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for label, s in stats.items():
        print(f"| {label} | " + " | ".join(f"{s[k]:.4g}" for k in keys) + " |")
    for label, pb in out["per_batch"].items():
        ns = sorted(pb["norms"])
        print(f"{label}: batch norms min {ns[0]:.4g}, median {ns[len(ns) // 2]:.4g}, "
              f"max {ns[-1]:.4g}; top direction in " + ", ".join(
                  f"{n} {v:.3f}" for n, v in list(out["top_direction"][label].items())[:3]))
    for m, a in out["agreement"].items():
        print(f"{m}: per-batch cosine {a['batch_cosine']:.4f}, "
              f"cosine of the means {a['mean_cosine']:.4f}, signal cosine {a['signal_cosine']:.4f}")
    if args.save:
        from mlomae.config import load_yaml
        from mlomae.tracking import atomic_write_text
        exp = load_yaml((args.run_dir / "config.yaml").read_text())["tracking"]["experiment"]
        tag = f"-{args.tag}" if args.tag else ""
        path = HERE / "results" / exp / f"{args.run_dir.name}-signal-s{step}{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
