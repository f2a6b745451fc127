"""``mlomae sweep`` (one run per point of the product of the grids, nested under one parent
MLflow run, resumable from its directory's ``sweep.json``) and ``mlomae compare`` (a table of an
MLflow experiment's runs; grouped: mean ± std per group, a plot, both logged to a sweep's
parent run)."""

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


def group(records: Sequence[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]
          ) -> list[dict[str, Any]]:
    """Runs grouped by the values of the params ``by`` (each record: ``params``, ``metrics``,
    ``seconds``): per group the number of runs, and for each metric and the wall time the mean
    and the sample standard deviation (n - 1; 0 for one run) over the runs that have it, in the
    order groups first appear."""
    import statistics
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r["params"].get(k) for k in by), []).append(r)
    out = []
    for key, runs in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        row["runs"] = len(runs)
        for m in [*metrics, "seconds"]:
            xs = [float(v) for r in runs if (v := (r["seconds"] if m == "seconds" else
                                                    r["metrics"].get(m))) is not None]
            row[m] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0,
                      len(xs)) if xs else None
        out.append(row)
    return out


def format_groups(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    """``markdown`` (mean ± std), ``csv`` (mean and std columns) or ``json``."""
    import json
    if fmt == "json":
        return json.dumps([{k: (dict(zip(("mean", "std", "n"), v)) if isinstance(v, tuple) else v)
                            for k, v in r.items()} for r in rows], indent=2)
    cols = list(rows[0]) if rows else []
    if fmt == "csv":
        moments = {k for k in cols for r in rows if isinstance(r[k], tuple)}
        head = [c for k in cols for c in ((f"{k}_mean", f"{k}_std") if k in moments else (k,))]
        lines = [",".join(head)]
        for r in rows:
            cells = []
            for k in cols:
                v = r[k]
                if k in moments:
                    cells += [f"{v[0]:.6g}", f"{v[1]:.6g}"] if isinstance(v, tuple) else ["", ""]
                else:
                    cells.append("" if v is None else str(v))
            lines.append(",".join(cells))
        return "\n".join(lines)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            (f"{r[k][0]:.4g} ± {r[k][1]:.2g}" if isinstance(r[k], tuple) else
             "–" if r[k] is None else str(r[k])) for k in cols) + " |")
    return "\n".join(lines)


def _moments(xs: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; 0 for one value), count: as ``group``."""
    import statistics
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _label(by: Sequence[str], key: tuple) -> str:
    return str(key[0]) if len(by) == 1 else ", ".join(f"{k}={v}" for k, v in zip(by, key))


def plot_series(records: Sequence[dict[str, Any]], by: Sequence[str], metric: str,
                curve: str | None) -> dict[str, Any]:
    """What ``compare --plot`` draws, per group of ``by`` (in the order groups first appear):

    - ``points``: the group's ``metric`` against its wall time, each as mean, std and count
      (as in the table);
    - ``curves``: the group's training curve of ``curve``: at each step any of its runs logged,
      the mean, std and count over the runs that have it (each record's ``history[curve]`` is a
      list of ``(step, value)``)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r["params"].get(k) for k in by), []).append(r)
    points, curves = [], []
    for key, runs in groups.items():
        label = _label(by, key)
        ys = [float(v) for r in runs if (v := r["metrics"].get(metric)) is not None]
        xs = [float(r["seconds"]) for r in runs if r.get("seconds") is not None]
        if ys and xs:
            (y, yerr, n), (x, xerr, _) = _moments(ys), _moments(xs)
            points.append({"group": label, "x": x, "xerr": xerr, "y": y, "yerr": yerr, "n": n})
        if curve:
            at: dict[int, list[float]] = {}
            for r in runs:
                for step, v in (r.get("history") or {}).get(curve, []):
                    if v is not None and v == v:  # NaN-free
                        at.setdefault(int(step), []).append(float(v))
            if at:
                steps = sorted(at)
                m = [_moments(at[s]) for s in steps]
                curves.append({"group": label, "steps": steps, "mean": [a for a, _, _ in m],
                               "std": [b for _, b, _ in m], "n": [c for _, _, c in m]})
    return {"metric": metric, "curve": curve, "points": points, "curves": curves}


def draw_plot(series: dict[str, Any], path: str | os.PathLike) -> Path:
    """Two panels (PNG, matplotlib's Agg backend): the metric against wall time with error bars
    of one standard deviation on both axes; the training curves, mean with a ±std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys([p["group"] for p in series["points"]] +
                               [c["group"] for c in series["curves"]]))
    color = {g: colors[i % len(colors)] for i, g in enumerate(names)}
    for p in series["points"]:
        a.errorbar(p["x"], p["y"], xerr=p["xerr"], yerr=p["yerr"], fmt="o", capsize=3,
                   color=color[p["group"]], label=f"{p['group']} (n={p['n']})")
    a.set_xlabel("wall time per run (s)")
    a.set_ylabel(series["metric"])
    a.set_title(f"{series['metric']}: mean ± std against wall time", fontsize=9)
    if series["points"]:
        a.legend(fontsize=7)
    for c in series["curves"]:
        import numpy as np
        s, m, d = np.asarray(c["steps"]), np.asarray(c["mean"]), np.asarray(c["std"])
        b.plot(s, m, color=color[c["group"]], label=c["group"])
        b.fill_between(s, m - d, m + d, color=color[c["group"]], alpha=0.2, linewidth=0)
    b.set_xlabel("outer step")
    b.set_ylabel(series["curve"] or "")
    b.set_title(f"{series['curve']}: mean ± std over runs", fontsize=9)
    if series["curves"]:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_groups(records: Sequence[dict[str, Any]], by: Sequence[str], metric: str,
                curve: str | None, path: str | os.PathLike) -> dict[str, Any]:
    """``plot_series`` drawn to ``path``; returns the series."""
    series = plot_series(records, by, metric, curve)
    draw_plot(series, path)
    return series


def _history(client, run, rd: Path | None, curve: str) -> list[tuple[int, float]]:
    """A run's ``curve`` from its ``metrics.jsonl`` when its directory is known and present,
    otherwise from MLflow's metric history."""
    if rd is not None and (rd / "metrics.jsonl").exists():
        out = []
        for line in (rd / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if isinstance(rec.get(curve), (int, float)) and "step" in rec:
                out.append((int(rec["step"]), float(rec[curve])))
        return out
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, curve)]


def _sweep_parent(client, sweep: str) -> str:
    """The parent run id of a sweep given by its directory (``sweep.json``) or by the id."""
    p = Path(sweep)
    if (p / SWEEP_FILE).exists():
        parent = (_read_json(p / SWEEP_FILE) or {}).get("parent_run_id")
        if not parent:
            raise ConfigError("this sweep has no parent MLflow run (run without tracking?)",
                              key="--sweep", value=sweep)
        return parent
    try:
        client.get_run(sweep)
    except Exception:
        raise ConfigError("neither a sweep directory nor an MLflow run id", key="--sweep",
                          value=sweep) from None
    return sweep


def _log_to_parent(client, parent: str, rows: list[dict[str, Any]], plot: Path | None) -> None:
    """The grouped table as ``compare/summary.md``, ``.csv`` and an MLflow table
    (``compare/summary_table.json``, shown in the UI's artifact view), the plot as an image."""
    import tempfile
    try:
        with tempfile.TemporaryDirectory() as d:
            for ext, fmt in (("md", "markdown"), ("csv", "csv")):
                f = Path(d) / f"summary.{ext}"
                f.write_text(format_groups(rows, fmt) + "\n")
                client.log_artifact(parent, str(f), artifact_path="compare")
        cols = list(rows[0]) if rows else []
        data: dict[str, list[Any]] = {}
        for k in cols:
            if any(isinstance(r[k], tuple) for r in rows):
                data[f"{k}_mean"] = [r[k][0] if r[k] else None for r in rows]
                data[f"{k}_std"] = [r[k][1] if r[k] else None for r in rows]
            else:
                data[k] = [r[k] for r in rows]
        client.log_table(parent, data=data, artifact_file="compare/summary_table.json")
        if plot is not None:
            client.log_artifact(parent, str(plot), artifact_path="compare")
    except Exception as e:
        warn(f"could not log the comparison to the sweep's parent run {parent} ({e})")


def compare(experiment: str, uri: str = "sqlite:///runs/mlflow.db",
            metrics: str | None = None, group_by: str | None = None, fmt: str = "markdown",
            plot: str | os.PathLike | None = None, curve: str | None = None,
            sweep: str | None = None) -> str:
    """Runs of an MLflow experiment: the params that differ between them and final metrics;
    with ``group_by`` (comma-separated params), one row per group: mean ± std over the runs.

    ``sweep`` (a sweep directory or its parent run id) keeps that sweep's children only and logs
    the grouped table, and the plot if any, to its parent run. ``plot`` (needs ``group_by``)
    draws the first metric against wall time and the training curve ``curve`` (default: the
    first ``*/loss`` metric, alphabetically) per group (``plot_series``)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no MLflow experiment named '{experiment}' at {uri}",
                          key="experiment", value=experiment,
                          hint=("known: " + ", ".join(names)) if names else None)
    if plot is not None and not group_by:
        raise ConfigError("--plot draws groups: give --group-by too", key="--plot", value=str(plot))
    parent = _sweep_parent(client, sweep) if sweep else None
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
            if r.data.tags.get("mlomae.sweep") != "parent"
            and (parent is None or r.data.tags.get("mlflow.parentRunId") == parent)]
    if not runs:
        return f"experiment '{experiment}' has no runs" + (f" under the sweep {sweep}" if sweep else "")
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    wanted = metrics.split(",") if metrics else sorted(
        {k for r in runs for k in r.data.metrics if k.startswith("eval/") or k.endswith("/loss")})
    if group_by:
        by = [k.strip() for k in group_by.split(",") if k.strip()]
        unknown = [k for k in by if k not in keys]
        if unknown:
            from .errors import did_you_mean
            raise ConfigError("no run has this param" + did_you_mean(unknown[0], keys),
                              key="--group-by", value=unknown[0])
        records = []
        for r in runs:
            tag = r.data.tags.get("mlomae.run_dir")
            rd = Path(tag) if tag and Path(tag).is_dir() else None
            summary = _read_json(rd / "summary.json") if rd else None
            # the run's own wall time (a resumed run's downtime excluded) where its directory
            # is at hand; otherwise MLflow's start to end
            seconds = (summary or {}).get("wall_time_seconds")
            if seconds is None and r.info.end_time and r.info.start_time:
                seconds = (r.info.end_time - r.info.start_time) / 1000
            records.append({"params": r.data.params, "metrics": r.data.metrics, "seconds": seconds,
                            "run": r, "run_dir": rd})
        rows = group(records, by, wanted)
        plot_path = None
        if plot is not None:
            if curve is None:
                losses = sorted({k for r in runs for k in r.data.metrics if k.endswith("/loss")})
                curve = losses[0] if losses else None
            if curve is not None:
                for rec in records:
                    rec["history"] = {curve: _history(client, rec["run"], rec["run_dir"], curve)}
            if not wanted:
                raise ConfigError("the runs have no metric to plot", key="--plot", value=str(plot))
            metric = wanted[0] if metrics else next((m for m in wanted if m.startswith("eval/")),
                                                     wanted[0])
            plot_path = Path(plot)
            plot_groups(records, by, metric, curve, plot_path)
        if parent:
            _log_to_parent(client, parent, rows, plot_path)
        return format_groups(rows, fmt)
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.info.run_name, "status": r.info.status}
        row.update({k: r.data.params.get(k) for k in differ})
        row.update({k: r.data.metrics.get(k) for k in wanted})
        rows.append(row)
    return table(rows)
