"""Does learned masking help? Every method x seed on Fashion-MNIST, equal pretraining steps,
then the same evaluations for all, aggregated into benchmarks/RESULTS.md.

    python benchmarks/study/run_study.py                      # everything (resumes, skips finished)
    python benchmarks/study/run_study.py --methods mae_random,mlomae --seeds 0
    python benchmarks/study/run_study.py --report             # only the table and the plots
    python benchmarks/study/run_study.py --study benchmarks/study/regime.yaml   # another study file

Runs live in benchmarks/study/runs/METHOD-sSEED (git-ignored; another study file names its own
folder with ``runs:``); each run trains in a process of its own (memory does not grow from run
to run), and a SIGTERM or Ctrl-C reaches it: it checkpoints and the study stops. A killed study
is simply started again: finished runs are skipped, interrupted ones resume from their last
checkpoint. Every run is tracked in the MLflow experiment `study`. The test split is read only
by the final evaluations; nothing is selected on it.

What the tables read from a finished run is kept apart from its folder (records.py), in a file
meant to be committed: benchmarks/study/results/EXPERIMENT/METHOD-sSEED.json (its evaluations,
final metrics, training minutes and the machine that trained it) beside its mask heat map, so a
study that takes many days survives a new clone. A run with such a record counts as finished;
delete the record to train it again.

A method with ``record_only: WHY`` keeps the records of runs this code can no longer train (the
code that trained them changed what they measure): they stay in the tables under their own name,
the study never trains it, and naming it in --methods is an error that says WHY.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
from mlomae.config import load_yaml  # noqa: E402  (after the path is set)

sys.path.insert(0, str(HERE))
import figures  # noqa: E402  (benchmarks/study/figures.py: the study's plots)
import records  # noqa: E402  (benchmarks/study/records.py: what a finished run leaves)

STUDY: dict = {}
RUNS = HERE / "runs"
RESULTS = HERE / "results" / "study"


def use_study(path: Path) -> None:
    """Read a study file: its runs live in HERE / its ``runs`` key (default ``runs``), the
    records of its finished runs in HERE / ``results`` (default ``results/EXPERIMENT``)."""
    global STUDY, RUNS, RESULTS
    STUDY = load_yaml(Path(path).read_text())
    RUNS = HERE / STUDY.get("runs", "runs")
    RESULTS = HERE / STUDY.get("results", f"results/{STUDY.get('experiment', 'study')}")


use_study(HERE / "study.yaml")


def shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def pretrain_per_outer(cfg) -> int:
    from mlomae.build import build_graph
    return build_graph(cfg).cycle().count(STUDY["pretrain_problem"])


def overrides(method: str, seed: int) -> list[str]:
    spec = STUDY["methods"][method]
    out = [f"seed={seed}", f"tracking.experiment={STUDY.get('experiment', 'study')}",
           f"tracking.run_name={method}-s{seed}", f"tracking.runs_dir={RUNS}", f"trainer.log_every={STUDY['log_every']}",
           f"trainer.checkpoint_every={STUDY['checkpoint_every']}",
           "evaluation=" + json.dumps(STUDY["evaluation"])]
    out += [f"models.mae.{k}={v}" for k, v in STUDY["model"].items()]
    out += list(STUDY.get("overrides", []))
    for o in spec.get("overrides", []):   # a YAML alias (*repaired) nests a list: flattened
        out += list(o) if isinstance(o, list) else [o]
    return out


def evaluate_missing(rd: Path, summary: dict) -> dict:
    """Run the study's evaluations a finished run has no result for (the evaluation list grew
    after it finished), on its final checkpoint, into its summary.json and MLflow run."""
    from mlomae.eval import run_protocol
    from mlomae.eval.features import default_model
    from mlomae.eval.rundir import load_run, merge_summary, record_metrics
    from mlomae.eval.spec import unique_name
    specs = list(STUDY["evaluation"])
    done = summary.get("eval") or {}
    if all(unique_name(specs, i, None) in done for i in range(len(specs))):
        return summary
    _, built, step = load_run(rd)
    for i, spec in enumerate(specs):
        name = unique_name(specs, i, default_model(built))
        if name in done:
            continue
        print(f"   {rd.name}: evaluating {name}", flush=True)
        result = run_protocol(built, {**spec, "name": name}, rd, key=f"evaluation[{i}]")
        merge_summary(rd, "eval", result)
        record_metrics(rd, step, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        done.update(result)
    return json.loads((rd / "summary.json").read_text())


def export_before(method: str) -> None:
    """A method with ``export_before: RUN`` (e.g. AutoMAE's frozen generator, ``random-s1``)
    reads that finished run's encoder from RESULTS/encoders/RUN.safetensors (kept with the
    records, in a folder of its own: the export's sidecar RUN.json would otherwise overwrite
    RUN's record): written when RUN finishes (``export_for_others``), else here the first time;
    a clear stop if RUN has not finished here."""
    run = STUDY["methods"][method].get("export_before")
    if not run:
        return
    out = RESULTS / "encoders" / f"{run}.safetensors"
    if out.exists():
        return
    summary = RUNS / run / "summary.json"
    if not summary.exists() or json.loads(summary.read_text()).get("status") != "FINISHED":
        kept = RESULTS / f"{run}.json"
        again = (f" (its record {shown(kept)} is kept but not its folder: delete the "
                 f"record to train it again)" if kept.exists() else "")
        raise SystemExit(f"error: method {method} reads the encoder of run {run}, which has not "
                         f"finished in {shown(RUNS)}{again}: run it first (--methods "
                         f"{run.rsplit('-s', 1)[0]} --seeds {run.rsplit('-s', 1)[1]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "mlomae", "export", str(RUNS / run), "--out", str(out)],
                   check=True, cwd=ROOT)


def export_for_others(run: str) -> None:
    """Export the run ``run`` (METHOD-sSEED) as soon as it has finished when another method reads
    its encoder (``export_before``): its folder may not outlive this checkout, its record does."""
    for method, spec in STUDY["methods"].items():
        if spec.get("export_before") == run:
            export_before(method)
            return


def run_one(method: str, seed: int) -> dict:
    from mlomae.config import load
    from mlomae.run import Runner
    rd = RUNS / f"{method}-s{seed}"
    summary = rd / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "FINISHED":
        rec = records.save(rd, evaluate_missing(rd, json.loads(summary.read_text())), RESULTS)
        export_for_others(rd.name)
        return rec
    kept = RESULTS / f"{method}-s{seed}.json"
    if kept.exists():   # finished in an earlier clone: only its record is here
        print(f"   {method} seed {seed}: finished ({shown(kept)})", flush=True)
        return json.loads(kept.read_text())
    export_before(method)
    exp = ROOT / STUDY["methods"][method]["experiment"]
    ov = overrides(method, seed)
    cfg = load(exp, ov)
    per = pretrain_per_outer(cfg)
    steps = STUDY["methods"][method].get("pretrain_steps", STUDY["pretrain_steps"]) // per
    cfg = load(exp, ov + [f"trainer.steps={steps}"])
    resume = (rd / "checkpoints").is_dir() and any((rd / "checkpoints").glob("*.pt"))
    if rd.exists() and not resume:  # stopped before its first checkpoint: nothing to keep
        import shutil
        shutil.rmtree(rd)
    if resume:
        cfg = load(rd / "config.yaml", [])
    print(f"== {method} seed {seed}: {steps} outer steps ({steps * per} pretraining steps)"
          f"{' (resuming)' if resume else ''}", flush=True)
    from mlomae.build import source_commit
    if (code := source_commit()) and code.endswith("+dirty"):
        print(f"   warning: the working tree has uncommitted changes: the record will name "
              f"{code}, which no commit reproduces (commit first to avoid it)", flush=True)
    out = Runner(cfg, run_dir=rd, resume=resume).run()
    if out.get("status") == "FINISHED":
        records.save(rd, out, RESULTS)
        export_for_others(rd.name)
    return out


def mean_std(xs: list[float], signed: bool = False) -> str:
    """"m ± s" over seeds; ``signed`` for differences (+/−, and no "(1 seed)" tag: the paired
    table has a seeds column of its own)."""
    fmt = "+.2f" if signed else ".2f"
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:{fmt}}" + ("" if signed else " (1 seed)")
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):.2f}"


def agreement(run: dict) -> float | None:
    """A run's final mask agreement: the mask level's (a learned masker), else the pretraining
    level's (self-guided and object masks); None for uniform random masks."""
    fm = run.get("final_metrics", {})
    return fm.get("mask/mask_agreement", fm.get("pretrain/mask_agreement"))


def report() -> str:
    """The markdown table: mean ± std over finished seeds per method, the pretraining wall time,
    and where a masker learns, its final mask agreement (1 = one mask for every image)."""
    rows = records.collect(RESULTS)
    metrics = STUDY["report_metrics"]
    head = ("| method | seeds | " + " | ".join(metrics.values())
            + " | pretraining time (min) | mask agreement |")
    lines = [head, "|" + "---|" * (len(metrics) + 4)]
    pending = [m for m in STUDY["methods"] if not rows.get(m) and not STUDY["methods"][m].get("record_only")]
    for method in STUDY["methods"]:
        runs = rows.get(method, [])
        if not runs:
            continue
        cells = [mean_std([r["eval"][m] for r in runs if m in r.get("eval", {})]) for m in metrics]
        wall = mean_std([r["train_minutes"] for r in runs])
        agree = mean_std([agreement(r) for r in runs if agreement(r) is not None])
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {wall} | {agree} |")
    if pending:
        lines += ["", "Not finished on any seed yet: " + ", ".join(pending) + "."]
    lines += ["", machines(rows)]
    return "\n".join(lines) + "\n\n" + paired(rows, metrics)


def machines(rows: dict) -> str:
    """Which machine trained which runs (pretraining times compare only within one)."""
    by: dict = {}
    for method in STUDY["methods"]:
        for r in rows.get(method, []):
            by.setdefault(r.get("machine", "unknown"), []).append(f"{method}-s{r['seed']}")
    if len(by) <= 1:
        return f"Trained on {next(iter(by), '–')} (every run)."
    return "Trained on " + "; ".join(f"{m}: {', '.join(runs)}" for m, runs in by.items()) + "."


def paired(rows: dict, metrics: dict, base: str | None = None) -> str:
    """Each method minus ``base`` on the same seed, mean ± std over the seeds both have
    finished (the comparison the study's goal is stated in), and the pretraining time ratio:
    each of those runs' minutes over the mean of ``base``'s runs *on the same machine* (a run
    whose machine trained no ``base`` run has no ratio: times compare only within a machine)."""
    base = base or STUDY.get("baseline", "mae_random")
    by_seed = {r["seed"]: r for r in rows.get(base, [])}
    base_minutes: dict = {}
    for b in rows.get(base, []):
        base_minutes.setdefault(b.get("machine"), []).append(b["train_minutes"])
    keys = [m for m in metrics if not m.endswith("_pixels_top1")]
    lines = [f"Difference from {base} on the same seed (points; time as a ratio to {base} "
             f"on the same machine):", "",
             "| method | seeds | " + " | ".join(metrics[m] for m in keys) + " | time ratio |",
             "|" + "---|" * (len(keys) + 3)]
    for method in STUDY["methods"]:
        if method == base:
            continue
        pairs = [(r, by_seed[r["seed"]]) for r in rows.get(method, []) if r["seed"] in by_seed]
        if not pairs:
            continue
        cells = []
        for m in keys:
            ds = [r["eval"][m] - b["eval"][m] for r, b in pairs
                  if m in r.get("eval", {}) and m in b.get("eval", {})]
            cells.append(mean_std(ds, signed=True))
        ratio = mean_std([r["train_minutes"] / statistics.mean(base_minutes[r.get("machine")])
                          for r, _ in pairs if r.get("machine") in base_minutes])
        lines.append(f"| {method} | {len(pairs)} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def run_child(study: Path, method: str, seed: int) -> int:
    """``run_one(method, seed)`` in a fresh process; SIGTERM / SIGINT sent to this one are passed
    on (the run checkpoints and exits), and its exit status is returned."""
    child = subprocess.Popen([sys.executable, __file__, "--study", str(study), "--one",
                              f"{method}:{seed}"], cwd=ROOT)

    def forward(signum, frame):
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write_results(path: Path, table: str) -> None:
    """Put ``table`` between the study's markers in ``path`` (``<!-- study: NAME -->`` and
    ``<!-- /study: NAME -->``, NAME the study's ``experiment``), written whole or not at all."""
    name = STUDY.get("experiment", "study")
    begin, end = f"<!-- study: {name} -->", f"<!-- /study: {name} -->"
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"error: {path}: needs one '{begin}' line and one '{end}' line after it "
                         f"to hold the study's table")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=HERE / "study.yaml", help="the study file")
    ap.add_argument("--methods", default=None, help="default: every method of the study")
    ap.add_argument("--seeds", default=None, help="default: the study's seeds")
    ap.add_argument("--report", action="store_true", help="only print the table from finished runs")
    ap.add_argument("--write-results", type=Path, default=None, metavar="MD",
                    help="also put the table between the study's markers in this file")
    ap.add_argument("--one", default=None, metavar="METHOD:SEED", help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_study(args.study)
    if args.one:   # one run, in this process (what each run's child process does)
        from mlomae.run import Stopped
        method, seed = args.one.rsplit(":", 1)
        try:
            run_one(method, int(seed))
        except Stopped as e:
            print(f"   {method} seed {seed}: {e}; checkpoint saved", flush=True)
            return 128 + e.signum
        return 0
    given = args.methods is not None
    args.methods = args.methods or ",".join(STUDY["methods"])
    args.seeds = args.seeds or ",".join(str(s) for s in STUDY["seeds"])
    unknown = [m for m in args.methods.split(",") if m not in STUDY["methods"]]
    if unknown:
        print(f"error: {args.study}: no method {', '.join(map(repr, unknown))} (methods: "
              f"{', '.join(STUDY['methods'])})", file=sys.stderr)
        return 2
    kept = [m for m in args.methods.split(",") if STUDY["methods"][m].get("record_only")]
    if kept and not args.report:
        if not given:
            args.methods = ",".join(m for m in args.methods.split(",") if m not in kept)
        else:
            for m in kept:
                print(f"error: {args.study}: method {m!r} is kept as a record only, not trained "
                      f"again: {STUDY['methods'][m]['record_only']}", file=sys.stderr)
            return 2
    if not args.report:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in filter(None, args.methods.split(",")):
                if seed not in STUDY["methods"][method].get("seeds", STUDY["seeds"]):
                    continue  # a diagnostic variant run on fewer seeds
                t0 = time.time()
                rc = run_child(args.study, method, seed)
                if rc != 0:
                    print(f"   {method} seed {seed} stopped (exit {rc}); the same command "
                          f"resumes it", flush=True)
                    return rc if rc > 0 else 128 - rc
                print(f"   done in {(time.time() - t0) / 60:.1f} min", flush=True)
    records.sync(RUNS, RESULTS)
    table = report()
    print(table)
    if args.write_results:
        write_results(args.write_results, table)
    for p in figures.draw(STUDY, RESULTS, HERE / STUDY.get("plots", "plots")):
        print(f"plot: {shown(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
