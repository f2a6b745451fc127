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

``--study`` times instead the learned-masking study's runs as benchmarks/study/run_study.py
builds them (its model, bf16, no augmentation, each method's own overrides, less the repaired
maskers' random warm-up: their cost after it), ``random`` against ``mlomae`` and the repaired
maskers, so a study run's minutes can be set against random masking's on the same machine when
no random run of the study was trained there.

    benchmarks/.venv-bench/bin/python benchmarks/learned_cost.py [--quick] [--horizons | --study]
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


STUDY_METHODS = ("random", "mlomae", "mlomae_repaired", "mlomae_repaired_adversarial")


def study_runs() -> dict:
    """name -> (experiment, overrides): the masking study's methods as run_study.py configures
    them (model, the study's overrides, the method's own; no evaluation, no tracking), without
    a random warm-up (the timed steps would all fall inside it): the cost after the warm-up."""
    from mlomae.config import load_yaml
    study = load_yaml((ROOT / "benchmarks/study/masking.yaml").read_text())
    base = [f"models.mae.{k}={v}" for k, v in study["model"].items()] + list(study["overrides"])
    rows = {}
    for name in STUDY_METHODS:
        spec = study["methods"][name]
        ov = list(base)
        for o in spec.get("overrides", []):   # a YAML alias (*repaired) nests a list
            ov += list(o) if isinstance(o, list) else [o]
        ov = [o for o in ov if not o.startswith("+problems.pretrain.warmup_steps=")]
        rows[f"study {name}"] = (spec["experiment"], ov)
    return rows


def engine(path: str, overrides: list[str], threads: int):
    extra = [] if "+data.augment=false" in overrides else ["+data.augment=false"]
    cfg = load(ROOT / path, overrides + ["evaluation=[]", "trainer.steps=100000",
                                         f"trainer.threads={threads}", *extra])
    built = build(cfg)
    per = built.engine.schedule.count("pretrain")
    return built, per


def main() -> None:
    ap = common.parser(__doc__, repeats=20, quick_repeats=6)
    ap.add_argument("--horizons", action="store_true",
                    help="also the repaired masker's hypergradient at horizons K = 1..8 (unroll) "
                         "and with darts / neumann / sama")
    ap.add_argument("--study", action="store_true",
                    help="only the masking study's runs as run_study.py builds them: random "
                         "against mlomae and the repaired maskers")
    args = ap.parse_args()
    repeats = common.setup(args)
    print(common.describe_machine(args.threads))
    if args.study:
        return study(args, repeats)
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


def study(args, repeats: int) -> None:
    """The study's runs timed side by side: ms per pretraining step and the ratio to random, and
    what 18,750 pretraining steps (one study run) take at that speed."""
    runs = study_runs()
    contenders, per = {}, {}
    for name, (path, ov) in runs.items():
        b, per[name] = engine(path, ov, args.threads)
        contenders[name] = b.engine.step
        if name == "study random":
            print(f"precision: {b.precision[0]} ({b.precision[1]})")
    times = common.interleave(contenders, repeats, warmup=2)
    med = {n: common.median(t) / per[n] for n, t in times.items()}
    steps = 18750
    print(common.table([[n, per[n], 1e3 * med[n], med[n] / med["study random"],
                         steps * med[n] / 60] for n in contenders],
                       ["study run", "pretraining steps / outer step", "ms / pretraining step",
                        "× random", f"minutes for {steps:,} pretraining steps"]))
    print(f"HEADLINE study-cost: mlomae (published) / random at the study's settings = "
          f"{med['study mlomae'] / med['study random']:.2f}x")
    common.save("learned_cost_study", {"ms_per_pretraining_step": {n: 1e3 * v for n, v in med.items()},
                                       "ratio_vs_random": {n: med[n] / med["study random"] for n in med},
                                       "times_s": times, "pretraining_steps_per_outer": per}, args)


if __name__ == "__main__":
    main()
