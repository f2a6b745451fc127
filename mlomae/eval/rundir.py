"""A finished run, reopened: its config rebuilt, its newest checkpoint loaded; and the way
results go back into it (``summary.json``, ``metrics.jsonl``, its MLflow run)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .. import checkpoint
from ..errors import ConfigError, MlomaeError
from ..tracking import RunDir, atomic_write_text, warn


def _run_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError("run directory not found", key="RUN_DIR", value=str(p))
    if not (p / "config.yaml").is_file():
        raise ConfigError("not a run directory (no config.yaml)", key="RUN_DIR", value=str(p))
    return p


def load_config(run_dir: Path):
    """The run's resolved config. File targets (``my_problems.py:Cls``) were written relative to
    the experiment file, so that file's place is used to find them when it still exists."""
    from ..config import load
    cfg = load(run_dir / "config.yaml")
    summary = read_summary(run_dir)
    original = summary.get("config_file")
    if original and Path(original).is_file():
        cfg.file = str(original)
    return cfg


def load_run(path: str | Path, *, need_checkpoint: bool = True):
    """(run_dir, built, step): the experiment rebuilt (no tracking, nothing written) with the
    module states of the newest intact checkpoint."""
    from ..build import build
    run_dir = _run_dir(path)
    cfg = load_config(run_dir)
    built = build(cfg)
    found = checkpoint.load_latest(run_dir / "checkpoints")
    if found is None:
        if need_checkpoint:
            raise MlomaeError(f"{run_dir}: no intact checkpoint in {run_dir / 'checkpoints'} (a run "
                              f"saves them when trainer.checkpoint_every > 0)")
        return run_dir, built, 0
    _, state = found
    try:
        built.engine.load_state_dict(state["engine"])
    except (KeyError, RuntimeError) as e:
        raise MlomaeError(f"{run_dir}: the checkpoint does not fit the run's config: "
                          f"{str(e).splitlines()[0]}") from None
    return run_dir, built, int(state["engine"].get("outer_step", 0))


def read_summary(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        warn(f"{p} is not valid JSON; starting a new summary")
        return {}


def merge_summary(run_dir: Path, section: str, values: Mapping[str, Any] | list) -> dict[str, Any]:
    """Merge ``values`` into ``summary.json[section]`` (a dict is updated, a list extended
    without duplicates) and write it back atomically."""
    summary = read_summary(run_dir)
    if isinstance(values, Mapping):
        summary[section] = {**(summary.get(section) or {}), **values}
    else:
        old = list(summary.get(section) or [])
        summary[section] = old + [v for v in values if v not in old]
    atomic_write_text(Path(run_dir) / "summary.json",
                      json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _mlflow_state(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "mlflow.json"
    if not p.is_file():
        return None
    try:
        state = json.loads(p.read_text())
    except json.JSONDecodeError:
        warn(f"{p} is not valid JSON; not logging to MLflow")
        return None
    return state if state.get("run_id") else None


def record_metrics(run_dir: Path, step: int, values: Mapping[str, float]) -> None:
    """Append ``eval/<name>`` to ``metrics.jsonl`` (so that ``mlomae sync`` can deliver it) and
    deliver it now to the run's MLflow run if it has one. A tracking failure only warns."""
    rd = RunDir(run_dir)
    rd.open_metrics()
    rd.append({"step": step, "time": time.time(), **{f"eval/{k}": v for k, v in values.items()}})
    rd.close()
    if _mlflow_state(run_dir) is None:
        return
    from ..tracking import sync
    try:
        sync(run_dir)
    except Exception as e:  # the numbers are in summary.json and metrics.jsonl; sync later
        warn(f"results not logged to MLflow ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
             f"'mlomae sync {run_dir}' delivers them later")


def log_artifacts(run_dir: Path, files: Iterable[Path], artifact_path: str) -> None:
    """Upload files to the run's MLflow run (if it has one) under ``artifact_path``."""
    state = _mlflow_state(run_dir)
    if state is None:
        return
    try:
        from ..tracking import _client
        client = _client(state.get("uri") or "sqlite:///runs/mlflow.db")
        for f in files:
            client.log_artifact(state["run_id"], str(f), artifact_path=artifact_path)
        client.log_artifact(state["run_id"], str(run_dir / "summary.json"))
    except Exception as e:
        warn(f"pictures not logged to MLflow ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
