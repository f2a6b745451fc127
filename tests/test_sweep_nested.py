"""`mlomae sweep` with two grids: one parent MLflow run, one nested child per point (counted in
a real sqlite store); a sweep killed after a point, or inside one, and started again runs only
what is left (the interrupted point resumes from its checkpoint) and ends with one child per
point; `compare --plot` draws numpy's mean and std of the runs and logs to the parent run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlomae.compare import compare, plot_groups
from mlomae.sweep import sweep

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")
GRID = ["hypergrad.method=darts,cg", "seed=0,1"]


def args(uri, experiment):
    return ["trainer.steps=12", "trainer.log_every=4", "trainer.checkpoint_every=5",
            f"tracking.uri={uri}", f"tracking.experiment={experiment}"]


def runs_of(uri, experiment):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlomae.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlomae.sweep") != "parent"]
    return parents, children


def points_of(children):
    return sorted((r.data.params["hypergrad.method"], r.data.params["seed"]) for r in children)


def cli(argv, fault=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLOMAE_FAULT", None)
    if fault:
        env["MLOMAE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mlomae", *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_two_grids_make_one_parent_with_four_nested_children(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.delenv("MLOMAE_FAULT", raising=False)
    out = io.StringIO()
    rows = sweep(TOY, GRID, args(mlflow_uri, "sweep-nested"), sweep_dir=tmp_path / "s", out=out)
    assert [r["status"] for r in rows] == ["FINISHED"] * 4
    parents, children = runs_of(mlflow_uri, "sweep-nested")
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert len(parents) == 1 and parents[0].info.run_id == state["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {state["parent_run_id"]}
    assert points_of(children) == [("cg", "0"), ("cg", "1"), ("darts", "0"), ("darts", "1")]
    assert [p["starts"] for p in state["points"]] == [1, 1, 1, 1]

    # compare the sweep: the table and the plot land on its parent run
    from mlflow.tracking import MlflowClient
    png = tmp_path / "cmp.png"
    text = compare("sweep-nested", uri=mlflow_uri, group_by="hypergrad.method",
                   metrics="eval/test_mse", plot=png, sweep=str(tmp_path / "s"))
    assert png.stat().st_size > 0
    lines = text.splitlines()
    assert lines[0] == "| hypergrad.method | runs | eval/test_mse | seconds |"
    mse = {r.data.params["hypergrad.method"]: [] for r in children}
    for r in sorted(children, key=lambda r: r.info.start_time):
        mse[r.data.params["hypergrad.method"]].append(r.data.metrics["eval/test_mse"])
    assert lines[2].startswith(f"| darts | 2 | {np.mean(mse['darts']):.4g} ± "
                               f"{np.std(mse['darts'], ddof=1):.2g} |")
    logged = {Path(a.path).name for a in MlflowClient(mlflow_uri).list_artifacts(
        state["parent_run_id"], "compare")}
    assert {"summary.md", "summary.csv", "summary_table.json", "cmp.png"} <= logged


@pytest.mark.slow
def test_a_sweep_killed_after_its_second_point_runs_only_the_other_two(mlflow_uri, tmp_path,
                                                                        monkeypatch):
    monkeypatch.delenv("MLOMAE_FAULT", raising=False)
    sd = tmp_path / "s"
    r = cli(["sweep", TOY, *[f"--grid={g}" for g in GRID], "--sweep-dir", str(sd),
             *args(mlflow_uri, "sweep-killed")], fault="sweep-after-point:1")
    assert r.returncode == -9, r.stderr[-2000:]
    state = json.loads((sd / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["FINISHED", "FINISHED", "PENDING", "PENDING"]
    assert len(runs_of(mlflow_uri, "sweep-killed")[1]) == 2

    out = io.StringIO()
    rows = sweep(None, [], [], resume=sd, out=out)
    assert [r["status"] for r in rows] == ["FINISHED"] * 4
    assert out.getvalue().count("finished earlier, skipped") == 2
    state = json.loads((sd / "sweep.json").read_text())
    assert [p["starts"] for p in state["points"]] == [1, 1, 1, 1]   # no point ran twice
    parents, children = runs_of(mlflow_uri, "sweep-killed")
    assert len(parents) == 1 and parents[0].info.run_id == state["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4 and len({c.info.run_id for c in children}) == 4
    assert points_of(children) == [("cg", "0"), ("cg", "1"), ("darts", "0"), ("darts", "1")]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {state["parent_run_id"]}


@pytest.mark.slow
def test_the_interrupted_point_resumes_from_its_checkpoint(mlflow_uri, tmp_path, monkeypatch,
                                                           capsys):
    """Killed at outer step 7 of the first point (checkpoint at 5): the restart resumes that
    point in its directory and MLflow run, then runs the second."""
    monkeypatch.delenv("MLOMAE_FAULT", raising=False)
    sd = tmp_path / "s"
    grid = ["--grid=hypergrad.method=darts,cg"]
    r = cli(["sweep", TOY, *grid, "--sweep-dir", str(sd), *args(mlflow_uri, "sweep-resumed")],
            fault="kill-after-step:7")
    assert r.returncode == -9, r.stderr[-2000:]
    first = sd / "00-method=darts"
    run_id = json.loads((first / "mlflow.json").read_text())["run_id"]
    assert not (first / "summary.json").exists()

    # the same sweep again on the same directory continues it
    out = io.StringIO()
    rows = sweep(TOY, ["hypergrad.method=darts,cg"], args(mlflow_uri, "sweep-resumed"),
                 sweep_dir=sd, out=out)
    assert [r["status"] for r in rows] == ["FINISHED"] * 2
    assert "[1/2] hypergrad.method=darts (resuming)" in out.getvalue()
    assert "from step_00000005.pt" in capsys.readouterr().err
    state = json.loads((sd / "sweep.json").read_text())
    assert [p["starts"] for p in state["points"]] == [2, 1]
    assert state["points"][0]["mlflow_run_id"] == run_id
    assert json.loads((first / "summary.json").read_text())["outer_steps"] == 12
    parents, children = runs_of(mlflow_uri, "sweep-resumed")
    assert len(parents) == 1 and len(children) == 2
    assert {c.info.run_id for c in children} >= {run_id}
    assert all(c.info.status == "FINISHED" for c in children)


def hand_made():
    """Two methods × three seeds (one seed of cg lacks its last logged step), made by hand."""
    out = []
    accs = {"darts": [80.0, 82.5, 81.0], "cg": [79.0, 83.0, 84.0]}
    secs = {"darts": [10.0, 11.0, 13.0], "cg": [20.0, 22.0, 21.0]}
    for method in accs:
        for seed in range(3):
            steps = [10, 20, 30] if not (method == "cg" and seed == 2) else [10, 20]
            hist = [(s, 1.0 / s + 0.1 * seed + (0.5 if method == "cg" else 0.0)) for s in steps]
            out.append({"params": {"hypergrad.method": method, "seed": str(seed)},
                        "metrics": {"eval/linear_top1": accs[method][seed]},
                        "seconds": secs[method][seed], "history": {"mask/loss": hist}})
    return out, accs, secs


def test_plotted_series_are_numpys_mean_and_std(tmp_path):
    records, accs, secs = hand_made()
    png = tmp_path / "plot.png"
    series = plot_groups(records, ["hypergrad.method"], "eval/linear_top1", "mask/loss", png)
    assert png.exists() and png.stat().st_size > 0
    assert [p["group"] for p in series["points"]] == ["darts", "cg"]
    for p in series["points"]:
        a, s = accs[p["group"]], secs[p["group"]]
        assert p["n"] == 3
        assert np.isclose(p["y"], np.mean(a)) and np.isclose(p["yerr"], np.std(a, ddof=1))
        assert np.isclose(p["x"], np.mean(s)) and np.isclose(p["xerr"], np.std(s, ddof=1))
    for c in series["curves"]:
        runs = [r["history"]["mask/loss"] for r in records
                if r["params"]["hypergrad.method"] == c["group"]]
        assert c["steps"] == [10, 20, 30]
        for i, step in enumerate(c["steps"]):
            vals = [v for h in runs for s, v in h if s == step]
            assert c["n"][i] == len(vals)
            assert np.isclose(c["mean"][i], np.mean(vals))
            assert np.isclose(c["std"][i], np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    cg = series["curves"][1]
    assert cg["group"] == "cg" and cg["n"] == [3, 3, 2]
