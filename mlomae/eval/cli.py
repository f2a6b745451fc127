"""``mlomae eval``, ``mlomae masks`` and ``mlomae export`` on a run directory.

Each rebuilds the run from its ``config.yaml`` (no tracking, nothing trained) and loads the
newest intact checkpoint. ``eval`` and ``masks`` write their results back into the run:
``summary.json`` (``eval`` / ``pictures``), ``metrics.jsonl`` and the run's MLflow run when
``mlflow.json`` names one (a tracking failure only warns).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from ..config import load_yaml
from ..errors import ConfigError


def _options(items: list[str]) -> dict[str, Any]:
    """``key=value`` protocol options, values read as YAML (``epochs=2``, ``pool=cls``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ConfigError("a protocol option has the form key=value", key="eval", value=item)
        try:
            out[k.strip()] = load_yaml(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def main(args: argparse.Namespace) -> int:
    """``mlomae eval RUN_DIR --protocol linear|finetune|knn [--labels 10%] [--model M] [k=v ...]``."""
    from . import run_protocol
    from .rundir import load_run, merge_summary, record_metrics
    from .spec import check_spec
    spec: dict[str, Any] = {"protocol": args.protocol, "labels": args.labels}
    if getattr(args, "model", None):
        spec["model"] = args.model
    for k, v in _options(getattr(args, "overrides", [])).items():
        if k in ("protocol", "labels", "model"):
            raise ConfigError(f"give {k} as --{k}", key=f"eval.{k}", value=v)
        spec[k] = v
    check_spec(spec, file="command line", key="eval")   # before the (slow) rebuild
    run_dir, built, step = load_run(args.run_dir)
    result = run_protocol(built, spec, run_dir, key="eval")
    merge_summary(run_dir, "eval", result)
    record_metrics(run_dir, step, {k: v for k, v in result.items() if isinstance(v, (int, float))})
    for k, v in result.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def masks_main(args: argparse.Namespace) -> int:
    """``mlomae masks RUN_DIR [--num N] [--out DIR]``: masks, mask heat map, training curves."""
    from .pictures import make_pictures
    from .rundir import load_run, log_artifacts, merge_summary
    run_dir, built, _ = load_run(args.run_dir)
    out_dir = Path(args.out) if getattr(args, "out", None) else run_dir / "pictures"
    files = make_pictures(built, run_dir, out_dir, num=args.num)

    def shown(p: Path) -> str:   # relative to the run directory when inside it
        try:
            return str(p.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            return str(p.resolve())

    merge_summary(run_dir, "pictures", {k: shown(p) for k, p in files.items()})
    log_artifacts(run_dir, files.values(), "pictures")
    for k, p in files.items():
        print(f"{k}: {p}")
    return 0


def export_main(args: argparse.Namespace) -> int:
    """``mlomae export RUN_DIR --format timm --out FILE [--model NAME]``."""
    from .export import export_timm
    from .pictures import is_mae
    from .rundir import load_run
    if args.format != "timm":
        raise ConfigError("unknown export format", key="--format", value=args.format,
                          hint="known: timm")
    run_dir, built, step = load_run(args.run_dir)
    name = getattr(args, "model", None)
    if name is None:
        name = next((n for n, m in built.models.items() if is_mae(m)), None)
        if name is None:
            raise ConfigError("no model of the run is a masked autoencoder", key="--model",
                              hint="models: " + ", ".join(built.models))
    elif name not in built.models:
        raise ConfigError("names no model of the run", key="--model", value=name,
                          hint="models: " + ", ".join(built.models))
    pool = getattr(args, "pool", None) or "cls"
    out, sidecar = export_timm(built.models[name], args.out, pool=pool,
                               extra={"run_dir": str(run_dir.resolve()), "model": name,
                                      "outer_step": step})
    print(f"wrote {out} and {sidecar}")
    print("load with: VisionTransformer(**json.load(open(sidecar))['timm_kwargs'])"
          ".load_state_dict(safetensors.torch.load_file(out), strict=True)")
    return 0
