"""Does learned masking help? Every method x seed on Fashion-MNIST, equal pretraining steps,
then the same evaluations for all, aggregated into benchmarks/RESULTS.md.

    python benchmarks/study/run_study.py                      # everything (resumes, skips finished)
    python benchmarks/study/run_study.py --methods mae_random,mlomae --seeds 0
    python benchmarks/study/run_study.py --report             # only rebuild RESULTS.md

Runs live in benchmarks/study/runs/METHOD-sSEED (git-ignored); a killed study is simply started
again: finished runs are skipped, interrupted ones resume from their last checkpoint. Every run
is tracked in the MLflow experiment `study`. The test split is read only by the final
evaluations; nothing is selected on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
STUDY = yaml.safe_load((HERE / "study.yaml").read_text())


def pretrain_per_outer(cfg) -> int:
    from mlomae.build import build_graph
    return build_graph(cfg).cycle().count(STUDY["pretrain_problem"])


def overrides(method: str, seed: int) -> list[str]:
    spec = STUDY["methods"][method]
    out = [f"seed={seed}", "tracking.experiment=study", f"tracking.run_name={method}-s{seed}",
           f"tracking.runs_dir={HERE / 'runs'}", f"trainer.log_every={STUDY['log_every']}",
           f"trainer.checkpoint_every={STUDY['checkpoint_every']}",
           "evaluation=" + json.dumps(STUDY["evaluation"])]
    out += [f"models.mae.{k}={v}" for k, v in STUDY["model"].items()]
    out += list(STUDY.get("overrides", []))
    out += list(spec.get("overrides", []))
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


def run_one(method: str, seed: int) -> dict:
    from mlomae.config import load
    from mlomae.run import Runner
    rd = HERE / "runs" / f"{method}-s{seed}"
    summary = rd / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "FINISHED":
        return evaluate_missing(rd, json.loads(summary.read_text()))
    exp = ROOT / STUDY["methods"][method]["experiment"]
    ov = overrides(method, seed)
    cfg = load(exp, ov)
    per = pretrain_per_outer(cfg)
    steps = STUDY["pretrain_steps"] // per
    cfg = load(exp, ov + [f"trainer.steps={steps}"])
    resume = (rd / "checkpoints").is_dir() and any((rd / "checkpoints").glob("*.pt"))
    if resume:
        cfg = load(rd / "config.yaml", [])
    print(f"== {method} seed {seed}: {steps} outer steps ({steps * per} pretraining steps)"
          f"{' (resuming)' if resume else ''}", flush=True)
    return Runner(cfg, run_dir=rd, resume=resume).run()


def collect() -> dict:
    rows: dict = {}
    for rd in sorted((HERE / "runs").glob("*-s*")):
        s = rd / "summary.json"
        if not s.exists():
            continue
        d = json.loads(s.read_text())
        if d.get("status") != "FINISHED":
            continue
        method = rd.name.rsplit("-s", 1)[0]
        rows.setdefault(method, []).append(d)
    return rows


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f} (1 seed)"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def report() -> str:
    rows = collect()
    metrics = STUDY["report_metrics"]
    head = "| method | seeds | " + " | ".join(metrics.values()) + " | wall time (min) |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    for method in STUDY["methods"]:
        runs = rows.get(method, [])
        cells = [mean_std([r["eval"][m] for r in runs if m in r["eval"]]) for m in metrics]
        wall = mean_std([r["wall_time_seconds"] / 60 for r in runs])
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(STUDY["methods"]))
    ap.add_argument("--seeds", default=",".join(str(s) for s in STUDY["seeds"]))
    ap.add_argument("--report", action="store_true", help="only print the table from finished runs")
    args = ap.parse_args()
    if not args.report:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                t0 = time.time()
                run_one(method, seed)
                print(f"   done in {(time.time() - t0) / 60:.1f} min", flush=True)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
