"""Where do a learned masker's logits sit at a run's checkpoint, and can its probabilities still
carry a gradient?

    python benchmarks/study/masker_logits.py benchmarks/study/runs-masking/mlomae-s0 [--step N]
        [--batches 8] [--threads 1]

On ``--batches`` pretraining batches drawn from the checkpoint's loader position (the
`pretrain` split; nothing else is read), the masker's logits in float32, as the problem computes
them (``MaskingSpec.logits``: over the MAE's patch embeddings or the images). With k the number
of masked patches, the top-k logits of each image are the patches MLO-MAE's deterministic top-k
masks; their probabilities weight the MAE's loss, and p (1 - p) is the derivative through which
that loss reaches the masker. Printed: the logits' quantiles, those of the masked ones, the share
of masked logits at which the sigmoid rounds to exactly 1 (above about 6.2 in bf16, 16.6 in
float32; there p (1 - p) is 0 and so is the masker's gradient through the weights), the largest
p (1 - p) over the masked patches in float32, and how much the logits vary across images.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# sigmoid(x) rounds to 1 once exp(-x) is below half an ulp of 1: 2**-9 in bf16, 2**-24 in float32
SATURATES = {"bf16": math.log(2 ** 9), "float32": math.log(2 ** 24)}


def logits_at(run_dir: Path, step: int | None, batches: int):
    """(outer step, [B * batch, L] float32 logits, number of masked patches per image)."""
    import torch
    from mlomae.build import build
    from mlomae.check import load_run_checkpoint
    from mlomae.models.masking import num_masked
    cfg, _, state = load_run_checkpoint(run_dir, step, ["evaluation=[]"])
    built = build(cfg)
    built.engine.load_state_dict(state["engine"])
    pre = built.problems["pretrain"]
    if not pre.spec.learned:
        raise ValueError(f"{run_dir}: the pretraining problem has no learned masker")
    masker, mae = pre.read(pre.masker), pre.module
    out = []
    with torch.no_grad():
        for _ in range(batches):
            x = pre.next_batch()[0]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x
            out.append(pre.spec.logits(x, mae, masker).float())
    z = torch.cat(out)
    return int(state["engine"]["outer_step"]), z, num_masked(z.shape[1], pre.spec.ratio)


def report(z, k: int) -> dict[str, float]:
    import torch
    top = z.topk(k, dim=1).values
    p = torch.sigmoid(top)
    q = lambda t, a: float(t.quantile(a))   # noqa: E731
    return {"min": float(z.min()), "q10": q(z, 0.1), "median": float(z.median()),
            "q90": q(z, 0.9), "max": float(z.max()),
            "masked_min": float(top.min()), "masked_median": float(top.median()),
            "masked_max": float(top.max()),
            **{f"masked_saturated_{d}": float((top > t).float().mean()) for d, t in SATURATES.items()},
            "masked_max_p1mp": float((p * (1 - p)).max()),
            "std_across_images": float(z.std(0).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--step", type=int, default=None, help="a checkpoint's outer step (default: the latest)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from mlomae.errors import MlomaeError
    torch.set_num_threads(args.threads)
    try:
        step, z, k = logits_at(args.run_dir, args.step, args.batches)
    except (MlomaeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = report(z, k)
    print(f"{args.run_dir.name}, outer step {step}: logits of {z.shape[0]} images x {z.shape[1]} "
          f"patches, {k} masked per image")
    print(f"  all logits: min {r['min']:.3g}, q10 {r['q10']:.3g}, median {r['median']:.3g}, "
          f"q90 {r['q90']:.3g}, max {r['max']:.3g}")
    print(f"  masked (top-{k}) logits: min {r['masked_min']:.3g}, median {r['masked_median']:.3g}, "
          f"max {r['masked_max']:.3g}")
    print(f"  masked logits where the sigmoid is exactly 1: {r['masked_saturated_bf16']:.4f} in bf16 "
          f"(> {SATURATES['bf16']:.1f}), {r['masked_saturated_float32']:.4f} in float32 "
          f"(> {SATURATES['float32']:.1f}); largest p (1 - p) over them in float32: "
          f"{r['masked_max_p1mp']:.3g}")
    print(f"  logits' spread across images (std per patch, mean over patches): "
          f"{r['std_across_images']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
