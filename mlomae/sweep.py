"""``mlomae sweep`` (one run per grid point under one parent MLflow run) and ``mlomae compare``
(a table of an MLflow experiment's runs)."""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any, Sequence

from .config import load
from .errors import ConfigError, MlomaeError
from .tracking import _client, _ensure_sqlite_dir, experiment_id, warn


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


def _parent_run(cfg, name: str) -> str | None:
    uri, exp = cfg["tracking"]["uri"], cfg["tracking"]["experiment"]
    try:
        _ensure_sqlite_dir(uri)
        client = _client(uri)
        exp_id = experiment_id(client, exp, uri)
        return client.create_run(exp_id, run_name=name, tags={"mlomae.sweep": "parent"}).info.run_id
    except Exception as e:  # tracking is optional: the runs still write their directories
        warn(f"could not create the sweep's parent MLflow run ({e}); runs are tracked without it")
        return None


def sweep(experiment: str, grid_items: Sequence[str], overrides: Sequence[str],
          no_tracking: bool = False, out=None) -> list[dict[str, Any]]:
    from .run import Runner
    out = out or sys.stdout
    grid = parse_grid(grid_items)
    if not grid:
        raise ConfigError("give at least one --grid key=v1,v2", key="--grid")
    points = [list(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    # validate every point before running any
    cfgs = [load(experiment, list(overrides) + [f"{k}={v}" for k, v in pt]) for pt in points]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = None
    if not no_tracking and cfgs[0]["tracking"]["enabled"]:
        parent = _parent_run(cfgs[0], f"sweep-{cfgs[0]['name']}-{stamp}")
    rows = []
    for i, (pt, cfg) in enumerate(zip(points, cfgs)):
        label = " ".join(f"{k}={v}" for k, v in pt)
        print(f"[{i + 1}/{len(points)}] {label}", file=out, flush=True)
        row: dict[str, Any] = {k: v for k, v in pt}
        try:
            runner = Runner(cfg, tracking=not no_tracking, parent_run_id=parent)
            summary = runner.run()
            row.update(status=summary["status"], run_dir=str(runner.run_dir.path),
                       wall=summary["wall_time_seconds"], **summary["eval"])
            for k, v in summary["final_metrics"].items():
                if k.endswith("/loss"):
                    row[k] = v
        except MlomaeError as e:
            row.update(status="FAILED", error=str(e))
            print(f"  failed: {e}", file=out)
        rows.append(row)
    if parent:
        try:
            status = "FINISHED" if all(r["status"] == "FINISHED" for r in rows) else "FAILED"
            _client(cfgs[0]["tracking"]["uri"]).set_terminated(parent, status=status)
        except Exception as e:
            warn(f"could not close the sweep's parent run: {e}")
    print(table(rows), file=out)
    return rows


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


def compare(experiment: str, uri: str = "sqlite:///runs/mlflow.db",
            metrics: str | None = None, group_by: str | None = None, fmt: str = "markdown") -> str:
    """Runs of an MLflow experiment: the params that differ between them and final metrics;
    with ``group_by`` (comma-separated params), one row per group: mean ± std over the runs."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no MLflow experiment named '{experiment}' at {uri}",
                          key="experiment", value=experiment,
                          hint=("known: " + ", ".join(names)) if names else None)
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
            if r.data.tags.get("mlomae.sweep") != "parent"]
    if not runs:
        return f"experiment '{experiment}' has no runs"
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
        records = [{"params": r.data.params, "metrics": r.data.metrics,
                    "seconds": ((r.info.end_time - r.info.start_time) / 1000
                                if r.info.end_time and r.info.start_time else None)} for r in runs]
        return format_groups(group(records, by, wanted), fmt)
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.info.run_name, "status": r.info.status}
        row.update({k: r.data.params.get(k) for k in differ})
        row.update({k: r.data.metrics.get(k) for k in wanted})
        rows.append(row)
    return table(rows)
