"""A tracking server that dies mid-run: training goes on, the metrics stay in metrics.jsonl,
a warning says so, and `mlomae sync` delivers them once a server is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MlflowServer

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")


@pytest.mark.slow
def test_server_killed_mid_run_then_sync(tmp_path):
    server = MlflowServer(str(tmp_path)).start()
    rd = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "mlomae", "run", TOY, "--run-dir", str(rd),
                          f"tracking.uri={server.uri}", "trainer.steps=1500", "trainer.log_every=5",
                          "hypergrad.method=darts", "trainer.checkpoint_every=0"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        state = rd / "mlflow.json"
        while time.time() < deadline:
            if state.exists() and json.loads(state.read_text()).get("delivered_lines", 0) > 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("nothing delivered to the server")
        server.stop()  # SIGKILL, mid-run
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
        server.stop()
    assert p.returncode == 0, err
    assert "is unreachable" in err and "mlomae sync" in err
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1500 // 5 + 1  # every record kept locally (+ the final evaluation)
    st = json.loads((rd / "mlflow.json").read_text())
    assert 0 < st["delivered_lines"] < len(lines)

    # a server comes back on the same store (another port): sync delivers the rest exactly once
    again = MlflowServer(str(tmp_path))
    again.workdir = str(tmp_path)
    again.start()
    try:
        r = subprocess.run([sys.executable, "-m", "mlomae", "sync", str(rd), "--uri", again.uri],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert f"delivered {len(lines) - st['delivered_lines']} metric records" in r.stdout
        from mlflow.tracking import MlflowClient
        client = MlflowClient(again.uri)
        hist = client.get_metric_history(st["run_id"], "hyper/loss")
        assert [m.step for m in hist] == list(range(5, 1501, 5))
        assert client.get_run(st["run_id"]).data.metrics["eval/test_mse"] > 0
        assert json.loads((rd / "mlflow.json").read_text())["delivered_lines"] == len(lines)
    finally:
        again.stop()
