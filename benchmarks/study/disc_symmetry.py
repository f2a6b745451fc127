"""Does the mask discriminator judge the shape of a mask or where it sits? At a run's checkpoint,
the trained discriminator's mean score (LSGAN: 1 real, 0 fake) on one batch of the generator's
learned masks as generated, the same masks flipped left-right, up-down and rotated 180 degrees,
and real rectangles of the same count:

    python benchmarks/study/disc_symmetry.py benchmarks/study/runs-masking/automae-s0 [--step N]

A flip keeps a mask's shape and moves it, so when the generated masks score as fake and their
flips as real, the discriminator has learned the generator's position, not a shape. Only the
training split the discriminator reads is touched; test is not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def scores(run_dir: Path, step: int | None, batch: int = 256) -> dict[str, float]:
    from mlomae.build import build
    from mlomae.check import load_run_checkpoint
    from mlomae.models.masking import random_rect_masks
    from problems.discriminator import Discriminator
    cfg, _, state = load_run_checkpoint(run_dir, step, ["evaluation=[]"])
    eng = build(cfg).engine
    eng.load_state_dict(state["engine"])
    discs = [p for p in eng.problems.values() if isinstance(p, Discriminator)]
    if not discs:
        raise ValueError(f"{run_dir}: no discriminator problem in this run")
    disc = discs[0]
    imgs = disc.next_batch()[0][:batch]
    with torch.no_grad():
        masks = eng.problems[disc.generator].generate(imgs).learned_mask
    gh, gw = disc.module.grid_size
    grid = masks.view(-1, gh, gw)
    count = int(round(float(masks[0].sum())))
    real = random_rect_masks(grid.shape[0], (gh, gw), None, count=count,
                             aspect=disc.aspect).to(grid.dtype)
    out = flip_scores(disc.module, grid)
    with torch.no_grad():
        out["real rectangles"] = float(disc.module(real).mean())
    return {"outer_step": int(state["engine"]["outer_step"]), "learned_patches": count, **out}


def flip_scores(disc, grid: torch.Tensor) -> dict[str, float]:
    """``disc``'s mean score on masks [N, gh, gw] as they are and flipped three ways."""
    cases = {"as generated": grid, "flipped left-right": grid.flip(2),
             "flipped up-down": grid.flip(1), "rotated 180": grid.flip(1).flip(2)}
    with torch.no_grad():
        return {k: float(disc(v).mean()) for k, v in cases.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="a checkpoint's outer step (default: the latest)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from mlomae.errors import MlomaeError
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        res = scores(args.run_dir, args.step)
    except (MlomaeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.run_dir.name}, outer step {res.pop('outer_step')}, "
          f"{res.pop('learned_patches')} learned patches per mask")
    for k, v in res.items():
        print(f"{k:20s} D = {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
