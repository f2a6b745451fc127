"""`mlomae run experiments/toy_bilevel.yaml` end to end: the run directory, the MLflow run
(sqlite and a real `mlflow server` on loopback), and the numbers in them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlomae.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")


def _run(tmp_path, uri, *extra):
    rd = tmp_path / "run"
    code = main(["run", TOY, "--run-dir", str(rd), f"tracking.uri={uri}", "trainer.steps=40",
                 "trainer.log_every=10", "trainer.checkpoint_every=20", *extra])
    assert code == 0
    return rd


def _check_run_dir(rd):
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "splits.npz", "splits.json", "mlflow.json"):
        assert (rd / f).exists(), f
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["outer_steps"] == 40
    # schedule: 5 regression steps per hyper step
    assert s["problem_steps"] == {"regression": 200, "hyper": 40}
    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    # 40 steps logged every 10 -> 4 records, plus the final evaluation
    assert [x["step"] for x in lines] == [10, 20, 30, 40, 40]
    assert "eval/test_mse" in lines[-1] and s["eval"]["test_mse"] == lines[-1]["eval/test_mse"]
    assert sorted(p.name for p in (rd / "checkpoints").glob("*.pt")) == ["step_00000020.pt", "step_00000040.pt"]
    return s, lines


def _check_mlflow(uri, rd, s, lines):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.steps"] == "40"
    assert run.data.params["problems.regression.steps"] == "5"
    hist = client.get_metric_history(run.info.run_id, "hyper/loss")
    assert [m.step for m in hist] == [10, 20, 30, 40]
    assert [m.value for m in hist] == pytest.approx([x["hyper/loss"] for x in lines[:4]], rel=1e-12)
    assert run.data.metrics["eval/test_mse"] == pytest.approx(s["eval"]["test_mse"], rel=1e-12)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= arts
    assert json.loads((rd / "mlflow.json").read_text())["delivered_lines"] == len(lines)


def test_toy_run_sqlite(tmp_path, mlflow_uri):
    rd = _run(tmp_path, mlflow_uri)
    s, lines = _check_run_dir(rd)
    _check_mlflow(mlflow_uri, rd, s, lines)


@pytest.mark.slow
def test_toy_run_real_mlflow_server(tmp_path, mlflow_server):
    rd = _run(tmp_path, mlflow_server.uri)
    s, lines = _check_run_dir(rd)
    _check_mlflow(mlflow_server.uri, rd, s, lines)
