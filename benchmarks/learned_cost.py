"""Issue "A regime where masking matters", speed: an MLO-MAE run against random masking at
equal pretraining steps, side by side in one process.

Both graphs are built from their experiment files as `mlomae run` builds them (real
Fashion-MNIST loaders, the precision `trainer.precision: auto` picks), then their outer steps
are timed interleaved; cost is per *pretraining* step (an outer step divided by the pretraining
steps it holds), and the headline is MLO-MAE / random (goal <= 1.5). Variants of the learned
cycle show where its time goes and what cuts it: the published 2/1/1 cycle, fewer mask steps
(pretrain 4 per mask step), a smaller mask batch.

``--horizons`` adds the cost of the hypergradient's horizon on the masking study's repaired
masker (its overrides read from benchmarks/study/masking.yaml): exact unrolling through the
K = 1, 2, 4, 8 pretraining steps of each mask step (the meta-objective after K steps, each of
them differentiated), against DARTS, Neumann and SAMA at K = 4 (the last step only, or the
implicit function theorem at the point reached).

    benchmarks/.venv-bench/bin/python benchmarks/learned_cost.py [--quick] [--horizons]
"""

from __future__ import annotations

import common
from mlomae.build import build
from mlomae.config import load

ROOT = common.ROOT.parent
RANDOM = ("random", "experiments/mae_random.yaml", [])
LEARNED = {
    "mlomae 2/1/1 (published)": ("experiments/mlomae_published.yaml", []),
    "mlomae 4/1/1": ("experiments/mlomae_published.yaml", ["problems.pretrain.steps=4"]),
    "mlomae 4/1/1, mask batch 64": ("experiments/mlomae_published.yaml",
                                    ["problems.pretrain.steps=4", "+problems.mask.batch_size=64"]),
}


def horizons() -> dict:
    """name -> (experiment, overrides): the study's repaired masker at each horizon / method."""
    from mlomae.config import load_yaml
    study = load_yaml((ROOT / "benchmarks/study/masking.yaml").read_text())
    # without its random warm-up: the timed steps would all fall inside it (trainer.steps is
    # large here), where the masks do not depend on the masker
    rep = [o for o in study["repaired"] if not o.startswith(("problems.pretrain.steps=",
                                                             "+problems.pretrain.warmup_steps="))]
    rows = {}
    for method in ("darts", "neumann", "sama"):
        rows[f"repaired, {method}, K=4"] = ("experiments/mlomae_published.yaml",
                                            rep + ["problems.pretrain.steps=4", f"hypergrad.method={method}"])
    for k in (1, 2, 4, 8):
        rows[f"repaired, unroll, K={k}"] = ("experiments/mlomae_published.yaml",
                                            rep + [f"problems.pretrain.steps={k}", "hypergrad.method=unroll"])
    return rows


def engine(path: str, overrides: list[str], threads: int):
    cfg = load(ROOT / path, overrides + ["evaluation=[]", "trainer.steps=100000",
                                         f"trainer.threads={threads}", "+data.augment=false"])
    built = build(cfg)
    per = built.engine.schedule.count("pretrain")
    return built, per


def main() -> None:
    ap = common.parser(__doc__, repeats=20, quick_repeats=6)
    ap.add_argument("--horizons", action="store_true",
                    help="also the repaired masker's hypergradient at horizons K = 1..8 (unroll) "
                         "and with darts / neumann / sama")
    args = ap.parse_args()
    repeats = common.setup(args)
    print(common.describe_machine(args.threads))
    contenders, per = {}, {}
    built_r, per["random"] = engine(RANDOM[1], RANDOM[2], args.threads)
    contenders["random"] = built_r.engine.step
    print(f"precision: {built_r.precision[0]} ({built_r.precision[1]})")
    learned = dict(LEARNED, **(horizons() if args.horizons else {}))
    for name, (path, ov) in learned.items():
        b, per[name] = engine(path, ov, args.threads)
        contenders[name] = b.engine.step
    times = common.interleave(contenders, repeats, warmup=2)
    med = {n: common.median(t) / per[n] for n, t in times.items()}
    rows = [[n, per[n], 1e3 * med[n], med[n] / med["random"]] for n in contenders]
    print(common.table(rows, ["graph", "pretraining steps / outer step", "ms / pretraining step",
                              "× random"]))
    if args.horizons:
        base = med["repaired, darts, K=4"]
        print(common.table([[n, per[n], 1e3 * med[n], med[n] / med["random"], med[n] / base]
                            for n in horizons()],
                           ["horizon", "pretraining steps / mask step", "ms / pretraining step",
                            "× random", "× darts K=4"]))
    best = min((n for n in LEARNED), key=med.get)
    print(f"HEADLINE regime-speed: MLO-MAE / random masking at equal pretraining steps = "
          f"{med['mlomae 2/1/1 (published)'] / med['random']:.2f}x published, "
          f"{med[best] / med['random']:.2f}x {best} (goal <= 1.5)")
    common.save("learned_cost", {"ms_per_pretraining_step": {n: 1e3 * v for n, v in med.items()},
                                 "ratio_vs_random": {n: med[n] / med["random"] for n in med},
                                 "times_s": times, "pretraining_steps_per_outer": per}, args)


if __name__ == "__main__":
    main()
