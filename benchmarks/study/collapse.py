"""Why does the MLO-MAE masker collapse? Short runs of the quickstart graph (Fashion-MNIST, MAE
embed 64 / depth 2, DARTS) that change one thing each, and how the mask statistics evolve:

    python benchmarks/study/collapse.py                 # every variant, 300 outer steps each
    python benchmarks/study/collapse.py --variants published,normalized --steps 100
    python benchmarks/study/collapse.py --saturation    # only: how fast the logits saturate

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


def hypergradient_stats(rd: Path, batches: int = 8) -> dict[str, float]:
    """At the run's final state: the masker's hypergradient on ``batches`` successive mask steps
    (each after its lower steps; at the end of the cosine schedule pretraining's lr is 0, so
    the MAE does not move between them). ``agreement``: mean pairwise cosine of those
    hypergradients (1 = the same direction from every batch, 0 = noise). ``common_mode``: for a
    masker with one output bias per patch (PatchMLPMasker's fc2.bias), the share of that bias's
    hypergradient that moves every patch's logit alike, L·mean² / ‖g‖² (1 = "raise or lower
    every probability", 1/L expected when patches are pushed independently)."""
    import torch
    from mlomae.eval.rundir import load_run
    _, built, _ = load_run(rd)
    eng = built.engine
    names = [n for n, _ in eng.problems["mask"].named_params()]
    flats, shares = [], []
    for _ in range(batches):
        eng.prefix("mask")
        _, _, hyper = eng.gradient("mask")
        flats.append(torch.cat([h.flatten() for h in hyper]))
        if "fc2.bias" in names:
            b = hyper[names.index("fc2.bias")]
            if b.numel() > 1:
                shares.append(float(b.numel() * b.mean() ** 2 / (b * b).sum().clamp_min(1e-30)))
    g = torch.nn.functional.normalize(torch.stack(flats), dim=1)
    cos = g @ g.T
    n = len(flats)
    out = {"agreement": float((cos.sum() - n) / (n * (n - 1)))}
    if shares:
        out["common_mode"] = sum(shares) / len(shares)
    return out


SHARED = ("models.masker={target: mlomae.models.maskers.SharedPatchMasker, embed_dim: 128, "
          "hidden_dim: 256}")
SATURATION = {  # at the study's size: (masker, its AdamW lr, loss weighting)
    "PatchMLPMasker, lr 1e-3 (published)": [],
    "PatchMLPMasker, lr 1e-4": ["problems.mask.optimizer.lr=1e-4"],
    "PatchMLPMasker, lr 1e-5": ["problems.mask.optimizer.lr=1e-5"],
    "PatchMLPMasker, lr 1e-4, normalized": ["problems.mask.optimizer.lr=1e-4",
                                            "+problems.pretrain.weighting=normalized"],
    "SharedPatchMasker, lr 1e-3": [SHARED],
    "SharedPatchMasker, lr 1e-3, normalized": [SHARED, "+problems.pretrain.weighting=normalized"],
}


def saturation(at: tuple[int, ...] = (1, 5, 10, 20)) -> None:
    """How fast the masker's logits move, from initialisation, at the study's model size
    (mlomae_published.yaml: MAE embed 128, depth 4; no augmentation): on one fixed batch, the logits'
    mean change and spread, the share of saturated probabilities (< 0.01 or > 0.99) and the
    mask agreement after each of the outer steps ``at`` (one masker AdamW step each)."""
    import torch
    from mlomae.build import build
    from mlomae.config import load
    from problems.mask import mask_stats
    base = ["models.mae.embed_dim=128", "models.mae.depth=4", "+data.augment=false", "seed=0"]
    print(f"\nmasker logits on one batch at the study's size, after k outer steps "
          f"(|change| / std / saturated share / mask agreement):")
    print("| masker | init std | " + " | ".join(f"k = {k}" for k in at) + " |")
    print("|---|---|" + "---|" * len(at))
    for name, extra in SATURATION.items():
        b = build(load(ROOT / "experiments" / "mlomae_published.yaml", base + extra))
        pre, mk, mae = b.problems["pretrain"], b.models["masker"], b.models["mae"]
        x = pre.next_batch()[0]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        with torch.no_grad():
            e = mae.embed_patches(x)
            l0 = mk.logits(e)
        cells = []
        for k in range(1, max(at) + 1):
            b.engine.step()
            if k in at:
                with torch.no_grad():
                    lk = mk.logits(mae.embed_patches(x))
                    agree = float(mask_stats(pre.masking_for(x))["mask_agreement"])
                p = torch.sigmoid(lk)
                sat = float(((p > 0.99) | (p < 0.01)).float().mean())
                cells.append(f"{float((lk - l0).abs().mean()):.2f} / {float(lk.std()):.2f} / "
                             f"{sat:.2f} / {agree:.2f}")
        print(f"| {name} | {float(l0.std()):.2f} | " + " | ".join(cells) + " |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--saturation", action="store_true",
                    help="only the logit-saturation measurement at the study's size")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.saturation:
        saturation()
        return 0
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
    print("\nthe masker's hypergradient at the end, over 8 successive mask steps:")
    print("| variant | pairwise cosine | common-mode share of the per-patch output bias |")
    print("|---|---|---|")
    for name in names:
        st = hypergradient_stats(RUNS / name)
        cm = f"{st['common_mode']:.2f}" if "common_mode" in st else "– (one shared bias)"
        print(f"| {name} | {st['agreement']:.2f} | {cm} |", flush=True)
    saturation()
    return 0


if __name__ == "__main__":
    sys.exit(main())
