"""MLflow artifacts live beside a sqlite store, whatever directory a run starts in."""

from __future__ import annotations

from pathlib import Path

from mlomae import config
from mlomae.run import Runner
from mlomae.tracking import artifact_root

ROOT = Path(__file__).resolve().parents[1]


def test_artifact_root_is_beside_the_sqlite_store(tmp_path):
    assert artifact_root(f"sqlite:///{tmp_path}/db/mlflow.db") == (tmp_path / "db" / "mlartifacts").as_uri()
    assert artifact_root("http://127.0.0.1:5000") is None


def test_a_run_started_elsewhere_puts_its_artifacts_beside_the_store(mlflow_uri, tmp_path, monkeypatch):
    """Started from another working directory, the run writes no ./mlruns there; its
    config.yaml lands in <store folder>/mlartifacts/<run id>/artifacts and reads
    back through the store with mlflow.artifacts."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(ROOT / "experiments" / "toy_bilevel.yaml",
                      ["trainer.steps=3", f"tracking.uri={mlflow_uri}",
                       "tracking.experiment=artifacts-beside-the-store"])
    Runner(cfg, run_dir=tmp_path / "run").run()
    assert not (elsewhere / "mlruns").exists() and not (elsewhere / "mlartifacts").exists()
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("artifacts-beside-the-store")
    store = Path(mlflow_uri[len("sqlite:///"):]).parent
    assert exp.artifact_location == (store / "mlartifacts").as_uri()
    run = client.search_runs([exp.experiment_id])[0]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                     tracking_uri=mlflow_uri, dst_path=str(tmp_path / "dl")))
    assert local.read_text() == (tmp_path / "run" / "config.yaml").read_text()
    assert list((store / "mlartifacts").rglob("config.yaml"))
