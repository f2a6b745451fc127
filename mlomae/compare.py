"""``mlomae compare``: a table of an MLflow experiment's runs; grouped by params (e.g. the
hypergradient method), mean ± std per group over the other axes (seeds), a plot, and for a
sweep both logged to its parent run (``mlomae.sweep``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError
from .sweep import SWEEP_FILE, _read_json, table
from .tracking import _client, experiment_id, warn


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
