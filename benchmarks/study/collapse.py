"""Why does the MLO-MAE masker collapse? Short runs of the quickstart graph (Fashion-MNIST, MAE
embed 64 / depth 2, DARTS) that change one thing each, and how the mask statistics evolve:

    python benchmarks/study/collapse.py                 # every variant, 300 outer steps each
    python benchmarks/study/collapse.py --variants published,normalized --steps 100

``mask/mask_agreement`` is 0 when masks are independent of the image and 1 when every image
gets the same mask; ``pretrain/masked_prob`` is the mean probability of the masked patches.
Nothing here is evaluated (no test split is read). Runs go to benchmarks/study/runs-collapse
(git-ignored), tracked in the MLflow experiment ``collapse``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs-collapse"

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "published": ("MLO-MAE as published: loss weights = probabilities", []),
    "normalized": ("weights divided by the mean masked probability (weighting: normalized)",
                   ["+problems.pretrain.weighting=normalized"]),
    "masker_lr_0.1x": ("masker AdamW lr 1e-4 instead of 1e-3", ["problems.mask.optimizer.lr=1.0e-4"]),
    "shared_masker": ("SharedPatchMasker: one MLP per patch token instead of one over all",
                      ["models.masker={target: mlomae.models.maskers.SharedPatchMasker, "
                       "embed_dim: 64, hidden_dim: 128}"]),
    "no_detach": ("masker input not detached (the official wiring)",
                  ["problems.pretrain.detach_masker_input=false"]),
}
AT = (10, 50, 100, 200, 300, 500, 1000)


def run(name: str, steps: int) -> Path:
    from mlomae.config import load
    from mlomae.run import Runner
    rd = RUNS / name
    overrides = [f"trainer.steps={steps}", "trainer.log_every=10", "evaluation=[]",
                 "tracking.experiment=collapse", f"tracking.run_name={name}",
                 f"tracking.runs_dir={RUNS}", "trainer.checkpoint_every=0"]
    cfg = load(ROOT / "experiments" / "quickstart.yaml", overrides + VARIANTS[name][1])
    summary = rd / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("outer_steps") == steps:
        return rd
    Runner(cfg, run_dir=rd, resume=False).run()
    return rd


def trajectory(rd: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (rd / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[int(row["step"])] = float(row[key])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    names = args.variants.split(",")
    at = [s for s in AT if s <= args.steps]
    rows = []
    for name in names:
        t0 = time.time()
        rd = run(name, args.steps)
        agree = trajectory(rd, "mask/mask_agreement")
        prob = trajectory(rd, "pretrain/masked_prob")
        print(f"== {name}: {(time.time() - t0) / 60:.1f} min", flush=True)
        cells = [f"{agree[s]:.2f} / {prob[s]:.2f}" if s in agree and s in prob else "–" for s in at]
        rows.append(f"| {name} | {VARIANTS[name][0]} | " + " | ".join(cells) + " |")
    print("mask_agreement / masked_prob at outer step:")
    print("| variant | change | " + " | ".join(str(s) for s in at) + " |")
    print("|---|---|" + "---|" * len(at))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
