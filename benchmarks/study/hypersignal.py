"""How much of the masker's hypergradient is signal? At a run's checkpoint, the hypergradient of
one problem (``mask`` by default) on many batches, and how much of it repeats from batch to
batch:

    python benchmarks/study/hypersignal.py benchmarks/study/runs-masking/mlomae_repaired-s0 \\
        [--step OUTER_STEP] [--batches 64] [--problem mask] [--save]

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
  of the batches (split-half agreement of the mean direction).

Only the ``mask`` and ``finetune`` splits are read (through the problems' own loaders); test is
not. ``--save`` keeps the numbers beside the study's records
(results/EXPERIMENT/RUN-signal-sSTEP.json, EXPERIMENT read from the run's config).
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
            "split_half_cosine": half}


def hypergradients(run_dir: Path, step: int | None, problem: str, batches: int,
                   threads: int) -> tuple[int, torch.Tensor, float]:
    """(outer step of the checkpoint, N x D hypergradients, pretraining lr at the checkpoint)."""
    from mlomae import checkpoint
    from mlomae.check import _engine, _flat
    from mlomae.config import load
    from mlomae.errors import ConfigError
    torch.set_num_threads(threads)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError("not a run directory (no config.yaml)", key="RUN_DIR", value=str(run_dir))
    found = {int(checkpoint.PATTERN.fullmatch(p.name).group(1)): p
             for p in checkpoint.list_checkpoints(run_dir / "checkpoints")}
    if step is None:
        latest = checkpoint.load_latest(run_dir / "checkpoints")
        if latest is None:
            raise ConfigError("no usable checkpoint", key="RUN_DIR", value=str(run_dir))
        state = latest[1]
    elif step not in found:
        raise ConfigError("no checkpoint of this outer step", key="--step", value=step,
                          hint="available: " + (", ".join(map(str, sorted(found))) or "none"))
    else:
        state = checkpoint.load(found[step])
    cfg = load(str(run_dir / "config.yaml"), ["evaluation=[]"])
    eng = _engine(cfg)
    if problem not in eng.problems:
        raise ConfigError("no such problem", key="--problem", value=problem,
                          hint="problems: " + ", ".join(eng.problems))
    eng.load_state_dict(state["engine"])
    checkpoint.set_rng_state(state["rng"])
    lr = eng.problems["pretrain"].lr if "pretrain" in eng.problems else float("nan")
    rows = []
    for _ in range(batches):
        eng.prefix(problem)
        _, _, hyper = eng.gradient(problem)
        rows.append(_flat(hyper))
    g = torch.stack(rows)
    if not bool(g.any()):
        raise ValueError(f"{run_dir}: every hypergradient of {problem!r} is zero at outer step "
                         f"{state['engine']['outer_step']} (inside the masker's random warm-up, or "
                         f"a pretraining lr of {lr:g}?): take a later --step")
    return int(state["engine"]["outer_step"]), g, float(lr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="a checkpoint's outer step (default: the latest)")
    ap.add_argument("--batches", type=int, default=64)
    ap.add_argument("--problem", default="mask")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", action="store_true", help="keep the numbers beside the study's records")
    args = ap.parse_args()
    from mlomae.errors import MlomaeError
    t0 = time.time()
    try:
        step, g, lr = hypergradients(args.run_dir, args.step, args.problem, args.batches, args.threads)
        stats = signal_stats(g)
    except (MlomaeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = {"run": args.run_dir.name, "outer_step": step, "problem": args.problem,
             "pretrain_lr": lr, **stats, "seconds": time.time() - t0}
    for k, v in stats.items():
        print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.save:
        from mlomae.config import load_yaml
        from mlomae.tracking import atomic_write_text
        exp = load_yaml((args.run_dir / "config.yaml").read_text())["tracking"]["experiment"]
        out = HERE / "results" / exp / f"{args.run_dir.name}-signal-s{step}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(stats, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
