"""``mlomae sweep``: one run per point of the product of the grids, nested under one parent
MLflow run, resumable from its directory's ``sweep.json``. ``mlomae compare`` (grouping, plots)
is ``mlomae.compare``."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .config import load
from .errors import ConfigError, MlomaeError
from .tracking import _client, _ensure_sqlite_dir, atomic_write_text, experiment_id, warn


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError("a grid entry has the form key.path=v1,v2,...", key="--grid", value=item)
        key, _, values = item.partition("=")
        vals = [v for v in values.split(",") if v != ""]
        if not vals:
            raise ConfigError("a grid entry needs at least one value", key="--grid", value=item)
        grid.append((key.strip(), vals))
    return grid


SWEEP_FILE = "sweep.json"


def _points(grid: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    return [list(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]


def _point_dir(i: int, pt: Sequence[tuple[str, str]]) -> str:
    """``03-method=cg-seed=1``: the index keeps the grid's order, the last part of each key and
    its value make the name readable (it is also the child run's name in MLflow)."""
    safe = lambda s: "".join(c if c.isalnum() or c in "._=+-" else "_" for c in str(s))
    return f"{i:02d}-" + "-".join(safe(f"{k.rsplit('.', 1)[-1]}={v}") for k, v in pt)


def _parent_run(cfg, name: str, sweep_dir: Path, grid_items: Sequence[str]) -> str | None:
    uri, exp = cfg["tracking"]["uri"], cfg["tracking"]["experiment"]
    try:
        _ensure_sqlite_dir(uri)
        client = _client(uri)
        exp_id = experiment_id(client, exp, uri)
        run = client.create_run(exp_id, run_name=name,
                                tags={"mlomae.sweep": "parent", "mlomae.sweep_dir": str(sweep_dir)})
        from mlflow.entities import Param
        client.log_batch(run.info.run_id, params=[Param(f"grid.{i}", g[:6000])
                                                  for i, g in enumerate(grid_items)])
        return run.info.run_id
    except Exception as e:  # tracking is optional: the runs still write their directories
        warn(f"could not create the sweep's parent MLflow run ({e}); runs are tracked without it")
        return None


def _reopen_parent(uri: str, run_id: str) -> bool:
    try:
        _client(uri).update_run(run_id, status="RUNNING")
        return True
    except Exception as e:
        warn(f"could not reopen the sweep's parent MLflow run {run_id} ({e})")
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _has_checkpoint(rd: Path) -> bool:
    from .checkpoint import list_checkpoints, verify
    return any(verify(p) is None for p in list_checkpoints(rd / "checkpoints"))


def _row(pt: Sequence[tuple[str, str]], summary: dict[str, Any], rd: Path) -> dict[str, Any]:
    row: dict[str, Any] = {k: v for k, v in pt}
    row.update(status=summary.get("status"), run_dir=str(rd), wall=summary.get("wall_time_seconds"),
               **(summary.get("eval") or {}))
    for k, v in (summary.get("final_metrics") or {}).items():
        if k.endswith("/loss"):
            row[k] = v
    return row


def _restart_clean(rd: Path, uri: str | None) -> None:
    """A point killed before its first checkpoint starts again from nothing; the MLflow run its
    first attempt created is deleted, so the sweep keeps one child per point."""
    import shutil
    state = _read_json(rd / "mlflow.json") or {}
    if uri and state.get("run_id"):
        try:
            _client(uri).delete_run(state["run_id"])
        except Exception as e:
            warn(f"could not delete the MLflow run {state['run_id']} of an attempt that left no "
                 f"checkpoint ({e})")
    shutil.rmtree(rd)


def _tag_child(uri: str, run_id: str | None, rd: Path, label: str) -> None:
    """``mlomae.run_dir`` lets ``compare`` read the run's ``metrics.jsonl`` and ``summary.json``."""
    if not run_id:
        return
    try:
        client = _client(uri)
        client.set_tag(run_id, "mlomae.run_dir", str(rd.resolve()))
        client.set_tag(run_id, "mlomae.sweep_point", label)
    except Exception as e:
        warn(f"could not tag the MLflow run {run_id} ({e})")


def _finish_child_if_open(uri: str, rd: Path) -> None:
    """A point whose summary says FINISHED but whose MLflow run is still open (the sweep was
    killed between the two): deliver what MLflow lacks and close it, as ``mlomae sync`` does."""
    state = _read_json(rd / "mlflow.json") or {}
    if not state.get("run_id"):
        return
    try:
        if _client(uri).get_run(state["run_id"]).info.status != "FINISHED":
            from .tracking import sync
            sync(rd, uri=uri)
    except Exception as e:
        warn(f"could not close the MLflow run of {rd} ({e}); 'mlomae sync {rd}' does it later")


def sweep(experiment: str | None, grid_items: Sequence[str], overrides: Sequence[str],
          no_tracking: bool = False, out=None, sweep_dir: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, retry_failed: bool = False
          ) -> list[dict[str, Any]]:
    """One run per point of the product of the grids, each in ``SWEEP_DIR/NN-key=value-...``,
    each a child of one parent MLflow run (``mlflow.parentRunId``). ``SWEEP_DIR/sweep.json``
    holds the experiment, the grids, the overrides, the parent run's id and each point's state,
    so that a sweep started again on the same directory (``resume``, or ``sweep_dir`` with the
    same experiment and grids) skips finished points, resumes an interrupted one from its last
    checkpoint, and adds its children to the same parent run. Points that failed (a non-finite
    loss, a bad config) are skipped on a restart unless ``retry_failed``."""
    from .checkpoint import _fault
    from .run import Runner, Stopped
    out = out or sys.stdout
    state: dict[str, Any] | None = None
    if resume is not None:
        sd = Path(resume)
        state = _read_json(sd / SWEEP_FILE)
        if state is None:
            raise ConfigError(f"not a sweep directory (no readable {SWEEP_FILE})", key="--resume",
                              value=str(sd))
        if experiment or grid_items or overrides:
            raise ConfigError("--resume takes the experiment, grids and overrides from "
                              f"{sd / SWEEP_FILE}; give none of them", key="--resume", value=str(sd))
        experiment, grid_items, overrides = state["experiment"], state["grid"], state["overrides"]
    if not experiment:
        raise ConfigError("give an experiment file, or --resume SWEEP_DIR")
    grid = parse_grid(grid_items)
    if not grid:
        raise ConfigError("give at least one --grid key=v1,v2", key="--grid")
    points = _points(grid)
    # validate every point before running any
    cfgs = [load(experiment, list(overrides) + [f"{k}={v}" for k, v in pt]) for pt in points]
    experiment_path = str(Path(experiment).resolve())
    if state is None and sweep_dir is not None and (Path(sweep_dir) / SWEEP_FILE).exists():
        sd = Path(sweep_dir)
        state = _read_json(sd / SWEEP_FILE)
        if state is None:
            raise ConfigError(f"unreadable {SWEEP_FILE}", key="--sweep-dir", value=str(sd))
        mine = (experiment_path, list(grid_items), list(overrides))
        if (state.get("experiment"), state.get("grid"), state.get("overrides")) != mine:
            raise ConfigError("this directory holds another sweep (experiment, grids or overrides "
                              "differ); continue it with --resume, or choose another --sweep-dir",
                              key="--sweep-dir", value=str(sd))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if state is None:
        sd = Path(sweep_dir) if sweep_dir else \
            Path(cfgs[0]["tracking"]["runs_dir"]) / f"sweep-{cfgs[0]['name']}-{stamp}"
        if sd.exists() and any(sd.iterdir()):
            raise ConfigError("sweep directory exists and is not empty", key="--sweep-dir",
                              value=str(sd), hint="continue a sweep with --resume SWEEP_DIR")
        sd.mkdir(parents=True, exist_ok=True)
        state = {"experiment": experiment_path, "grid": list(grid_items),
                 "overrides": list(overrides), "created": stamp, "parent_run_id": None,
                 "uri": cfgs[0]["tracking"]["uri"],
                 "mlflow_experiment": cfgs[0]["tracking"]["experiment"],
                 "points": [{"params": dict(pt), "run_dir": _point_dir(i, pt), "status": "PENDING",
                             "starts": 0, "mlflow_run_id": None} for i, pt in enumerate(points)]}
        print(f"sweep directory: {sd}", file=out, flush=True)
    else:
        print(f"continuing the sweep in {sd}", file=out, flush=True)
    tracking = not no_tracking and cfgs[0]["tracking"]["enabled"]
    uri = cfgs[0]["tracking"]["uri"]
    parent = state.get("parent_run_id")
    if tracking:
        if parent and not _reopen_parent(uri, parent):
            parent = None
        if not parent:
            parent = _parent_run(cfgs[0], f"sweep-{cfgs[0]['name']}-{state['created']}", sd.resolve(),
                                 grid_items)
        state["parent_run_id"] = parent

    def save() -> None:
        atomic_write_text(sd / SWEEP_FILE, json.dumps(state, indent=2) + "\n")

    save()
    rows = []
    for i, (pt, cfg) in enumerate(zip(points, cfgs)):
        label = " ".join(f"{k}={v}" for k, v in pt)
        rec = state["points"][i]
        rd = sd / rec["run_dir"]
        summary = _read_json(rd / "summary.json") or {}
        done = summary.get("status") == "FINISHED"
        failed = summary.get("status") == "FAILED" or (rec["status"] == "FAILED" and not
                                                        summary.get("status"))
        if done or (failed and not retry_failed):
            print(f"[{i + 1}/{len(points)}] {label}: {'finished' if done else 'failed'} earlier, "
                  "skipped", file=out, flush=True)
            if done and tracking:
                _finish_child_if_open(uri, rd)
            rows.append(_row(pt, summary, rd) if summary else
                        {**dict(pt), "status": "FAILED", "error": rec.get("error")})
            continue
        resume_point = rd.exists() and _has_checkpoint(rd)
        if rd.exists() and not resume_point:
            _restart_clean(rd, uri if tracking else None)
        print(f"[{i + 1}/{len(points)}] {label}" + (" (resuming)" if resume_point else ""),
              file=out, flush=True)
        rec.update(status="RUNNING", starts=rec["starts"] + 1)
        save()
        row: dict[str, Any] = dict(pt)
        runner = None
        try:
            if resume_point:  # as `mlomae run --resume`: the run's own resolved config
                cfg = load(str(rd / "config.yaml"), [])
                cfg.file = str(rd / "config.yaml")
            runner = Runner(cfg, run_dir=rd, resume=resume_point, tracking=tracking,
                            parent_run_id=parent)
            summary = runner.run()
            row = _row(pt, summary, rd)
            rec.update(status=summary["status"], mlflow_run_id=summary.get("mlflow_run_id"))
        except Stopped:
            rec["status"] = "KILLED"
            save()
            if parent:
                _close_parent(uri, parent, "KILLED")
            print(f"stopped; continue the sweep with: mlomae sweep --resume {sd}", file=sys.stderr)
            raise
        except MlomaeError as e:
            row.update(status="FAILED", error=str(e))
            rec.update(status="FAILED", error=str(e))
            print(f"  failed: {e}", file=out)
        if tracking:
            run_id = rec.get("mlflow_run_id") or (runner.tracker.run_id if runner and runner.tracker
                                                  else None)
            rec["mlflow_run_id"] = run_id
            _tag_child(uri, run_id, rd, label)
        save()
        rows.append(row)
        _fault(f"sweep-after-point:{i}")
    if parent:
        _close_parent(uri, parent, "FINISHED" if all(r["status"] == "FINISHED" for r in rows)
                      else "FAILED")
    print(table(rows), file=out)
    print(f"sweep directory: {sd}", file=out)
    if parent:
        at = "" if uri == "sqlite:///runs/mlflow.db" else f" --uri {uri}"
        print(f"compare: mlomae compare {state['mlflow_experiment']}{at} --sweep {sd} "
              f"--group-by {grid[0][0]} --plot {sd / 'compare.png'}", file=out)
    return rows


def _close_parent(uri: str, parent: str, status: str) -> None:
    try:
        _client(uri).set_terminated(parent, status=status)
    except Exception as e:
        warn(f"could not close the sweep's parent run: {e}")


def table(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols and k not in ("run_dir", "error"):
                cols.append(k)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
