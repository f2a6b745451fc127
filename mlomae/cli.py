"""The ``mlomae`` command: parses, calls, prints.

Errors caused by input (``MlomaeError``) print one line and exit with code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from .errors import ConfigError, MlomaeError

EXIT_INPUT = 2
EXIT_NONFINITE = 3


def _load(path: str, overrides: list[str]):
    from . import config
    return config.load(path, overrides)


# -- commands ---------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from .run import Runner, Stopped
    if args.reshard and not args.resume:
        raise ConfigError("--reshard continues a run with another number of processes: it "
                          "needs --resume RUN_DIR", key="--reshard")
    if args.resume:
        rd = Path(args.resume)
        cfg_file = rd / "config.yaml"
        if not cfg_file.exists():
            raise ConfigError("not a run directory (no config.yaml)", key="--resume", value=str(rd))
        overrides = list(args.overrides or [])
        if args.experiment:  # `--resume RD key=value ...`: the first override landed here
            if "=" not in args.experiment:
                raise ConfigError("give an experiment file or --resume RUN_DIR, not both",
                                  key="--resume", value=args.experiment)
            overrides.insert(0, args.experiment)
        cfg = _load(str(cfg_file), overrides)
        cfg.file = str(cfg_file)
        run_dir, resume = rd, True
    else:
        if not args.experiment:
            raise ConfigError("give an experiment file, or --resume RUN_DIR")
        cfg = _load(args.experiment, args.overrides)
        run_dir, resume = args.run_dir, False
    from .distributed import setup as dist_setup
    rank, world = dist_setup(cfg)
    try:
        runner = Runner(cfg, run_dir=run_dir, resume=resume, tracking=not args.no_tracking,
                        rank=rank, world=world, reshard=args.reshard)
        try:
            summary = runner.run()
        except Stopped as e:
            if rank == 0:
                print(f"stopped; resume with: mlomae run --resume {runner.run_dir.path}",
                      file=sys.stderr)
            return 128 + e.signum
    finally:
        from .distributed import teardown
        teardown()
    if rank == 0:
        print(f"run directory: {runner.run_dir.path}")
        for k, v in summary["eval"].items():
            if isinstance(v, float):
                print(f"{k}: {v:.4f}")
        # what to watch for a masker that collapsed onto one mask (1 = the same for every image)
        for k, v in (summary.get("final_metrics") or {}).items():
            if k.endswith("/mask_agreement") and isinstance(v, float):
                print(f"{k}: {v:.4f}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .build import build
    cfg = _load(args.experiment, args.overrides)
    built = build(cfg)
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in built.models.items()}
    print(f"{cfg.file}: ok")
    print(f"  problems: {', '.join(built.problems)}; schedule: {' '.join(built.engine.schedule)}")
    print("  models: " + ", ".join(f"{n} ({c / 1e6:.2f}M params)" for n, c in n_params.items()))
    if built.data is not None:
        print("  splits: " + ", ".join(f"{r}={len(i)}" for r, i in built.data.indices.items()))
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from .build import build_graph
    cfg = _load(args.experiment, args.overrides)
    graph = build_graph(cfg)
    if args.format in ("text", "both"):
        print(graph.describe())
    if args.format in ("mermaid", "both"):
        if args.format == "both":
            print()
        print("```mermaid\n" + graph.mermaid() + "\n```" if args.format == "both" else graph.mermaid())
    return 0


def cmd_check_hypergrad(args: argparse.Namespace) -> int:
    from .check import check_checkpoint, check_hypergrad, format_table
    methods = args.methods.split(",") if args.methods else None
    if Path(args.experiment).is_dir():   # a run directory: at one of its checkpoints
        step, rows = check_checkpoint(args.experiment, args.step, methods, args.overrides or [])
        print(f"{args.experiment}: checkpoint of outer step {step}")
        print(format_table(rows, at="this checkpoint's state, on the batches of the next outer step"))
    else:
        if args.step is not None:
            raise ConfigError("--step names a checkpoint: give a run directory, not an "
                              "experiment file", key="--step", value=args.step)
        cfg = _load(args.experiment, args.overrides)
        rows = check_hypergrad(cfg, methods=methods)
        print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .run import Stopped
    from .sweep import sweep
    try:
        rows = sweep(args.experiment, args.grid, args.overrides or [], no_tracking=args.no_tracking,
                     sweep_dir=args.sweep_dir, resume=args.resume, retry_failed=args.retry_failed)
    except Stopped as e:   # the sweep printed how to continue it
        return 128 + e.signum
    return 0 if all(r.get("status") == "FINISHED" for r in rows) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    print(compare(args.experiment, uri=args.uri, metrics=args.metrics, group_by=args.group_by,
                  fmt=args.format, plot=args.plot, curve=args.curve, sweep=args.sweep))
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from .tracking import sync
    try:
        n, run_id = sync(args.run_dir, uri=args.uri)
    except FileNotFoundError as e:
        raise ConfigError(f"not a run directory: {e}", key="RUN_DIR", value=args.run_dir) from None
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"delivered {n} metric records to MLflow run {run_id}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.cli import main as eval_main
    return eval_main(args)


def cmd_masks(args: argparse.Namespace) -> int:
    from .eval.cli import masks_main
    return masks_main(args)


def cmd_export(args: argparse.Namespace) -> int:
    from .eval.cli import export_main
    return export_main(args)


# -- parser -----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlomae", description="Multilevel optimization for masked "
                                "image modeling: declare problems and dependencies in YAML, train them together.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
        return sp

    sp = add("run", cmd_run, "train an experiment (or resume a run)")
    sp.add_argument("experiment", nargs="?", help="experiment YAML file")
    sp.add_argument("overrides", nargs="*", help="key.path=value overrides (+key=value adds a key)")
    sp.add_argument("--run-dir", help="run directory (default: tracking.runs_dir/NAME-TIMESTAMP)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    sp.add_argument("--reshard", action="store_true",
                    help="with --resume: continue with another number of processes than the "
                         "checkpoint's (not an exact resume: ranks without saved random states "
                         "draw fresh ones)")
    sp.add_argument("--no-tracking", action="store_true", help="no MLflow (the run directory is still written)")

    for name, fn, help in (("validate", cmd_validate, "check an experiment: schema, graph, targets, data"),
                           ("graph", cmd_graph, "show problems, dependencies, schedule and hypergradient paths"),
                           ("check-hypergrad", cmd_check_hypergrad,
                            "compare every hypergradient method with the exact unroll at the initial "
                            "state, or at a run's checkpoint")):
        sp = add(name, fn, help)
        sp.add_argument("experiment", help="experiment YAML file" + (
            " or run directory" if name == "check-hypergrad" else ""))
        sp.add_argument("overrides", nargs="*", help="key.path=value overrides")
        if name == "graph":
            sp.add_argument("--format", choices=["text", "mermaid", "both"], default="both")
        if name == "check-hypergrad":
            sp.add_argument("--methods", help="comma-separated (default: all)")
            sp.add_argument("--json", help="also write the rows to this file")
            sp.add_argument("--step", type=int, help="with a run directory: the checkpoint of "
                            "this outer step (default: the latest intact one)")

    sp = add("sweep", cmd_sweep, "one run per grid point, nested under one parent MLflow run; "
                                 "resumable")
    sp.add_argument("experiment", nargs="?", help="experiment YAML file (not with --resume)")
    sp.add_argument("overrides", nargs="*", help="key.path=value overrides applied to every point")
    sp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a swept key with its values (repeatable: the grid is the product)")
    sp.add_argument("--sweep-dir", help="the sweep's directory (default: tracking.runs_dir/"
                                        "sweep-NAME-TIMESTAMP); one holding the same sweep continues it")
    sp.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep: finished points are "
                    "skipped, an interrupted one resumes from its last checkpoint")
    sp.add_argument("--retry-failed", action="store_true",
                    help="on a restart, run the points that failed again")
    sp.add_argument("--no-tracking", action="store_true")

    sp = add("compare", cmd_compare, "table of an MLflow experiment's runs: differing params, final metrics")
    sp.add_argument("experiment", help="MLflow experiment name")
    sp.add_argument("--uri", default="sqlite:///runs/mlflow.db")
    sp.add_argument("--metrics", help="comma-separated metric names (default: all final metrics)")
    sp.add_argument("--group-by", help="comma-separated params (e.g. hypergrad.method): one row "
                                       "per group, mean ± std over its runs (e.g. the seeds)")
    sp.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown",
                    help="with --group-by: the table's format")
    sp.add_argument("--plot", metavar="FILE.png", help="with --group-by: the first metric against "
                    "wall time (error bars: std) and each group's training curve (mean ± std)")
    sp.add_argument("--curve", metavar="METRIC", help="the training curve's metric (default: the "
                    "first */loss, alphabetically)")
    sp.add_argument("--sweep", metavar="SWEEP_DIR|RUN_ID", help="only that sweep's runs; the "
                    "grouped table and the plot are logged to its parent run")

    sp = add("sync", cmd_sync, "deliver a run's metrics that MLflow has not received yet")
    sp.add_argument("run_dir")
    sp.add_argument("--uri", help="tracking URI (default: the run's own)")

    sp = add("eval", cmd_eval, "evaluate a run's encoder on the test split")
    sp.add_argument("run_dir")
    sp.add_argument("--protocol", choices=["linear", "finetune", "knn"], default="linear")
    sp.add_argument("--labels", default="100%", help="fraction of labels per class: 1%%, 10%%, 100%%")
    sp.add_argument("--model", help="the model whose encoder is evaluated (default: the MAE)")
    sp.add_argument("overrides", nargs="*", help="protocol options as key=value")

    sp = add("masks", cmd_masks, "draw a run's masks, reconstructions, mask heat map and curves")
    sp.add_argument("run_dir")
    sp.add_argument("--num", type=int, default=8, help="images in the grid")
    sp.add_argument("--out", help="output directory (default: RUN_DIR/pictures)")

    sp = add("export", cmd_export, "write a run's encoder for timm")
    sp.add_argument("run_dir")
    sp.add_argument("--format", choices=["timm"], default="timm")
    sp.add_argument("--out", required=True, help="output .safetensors file")
    sp.add_argument("--model", help="the model to export (default: the MAE)")
    sp.add_argument("--pool", choices=["cls", "mean"], default="cls",
                    help="the timm global_pool written beside the weights")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    # overrides (key=value) may come after options: collect the ones argparse left over
    args, rest = p.parse_known_args(argv)
    extra = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in extra]
    if unknown:
        p.error("unrecognized arguments: " + " ".join(unknown))
    if extra:
        if not hasattr(args, "overrides"):
            p.error("unrecognized arguments: " + " ".join(extra))
        args.overrides = list(args.overrides or []) + extra
    if not getattr(args, "fn", None):
        p.print_help()
        return EXIT_INPUT
    debug = args.debug or os.environ.get("MLOMAE_DEBUG") == "1"
    try:
        return args.fn(args)
    except MlomaeError as e:
        from .errors import NonFiniteError
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE if isinstance(e, NonFiniteError) else EXIT_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
