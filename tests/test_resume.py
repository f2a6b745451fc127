"""Kill a run at any moment, resume it, and end bit-identical to the run left alone.

Runs are real processes (`python -m mlomae run`) killed with SIGKILL by fault injection
(MLOMAE_FAULT) after an outer step, half-way through writing a checkpoint, and between a
checkpoint and its checksum; plus SIGTERM, and a corrupt checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")
ARGS = ["trainer.steps=30", "trainer.checkpoint_every=7", "trainer.log_every=5",
        "trainer.keep_checkpoints=10"]


def mlomae(args, fault=None, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLOMAE_FAULT", None)
    if fault:
        env["MLOMAE_FAULT"] = fault
    r = subprocess.run([sys.executable, "-m", "mlomae", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr[-3000:]}")
    return r


def strip(rec):
    return {k: v for k, v in rec.items() if k != "time" and not k.endswith("seconds")}


def outcome(rd: Path):
    lines = [strip(json.loads(x)) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    s = json.loads((rd / "summary.json").read_text())
    state = torch.load(rd / "checkpoints" / "step_00000030.pt", weights_only=False)
    return lines, s, state


def same_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rd = tmp_path_factory.mktemp("ref") / "run"
    mlomae(["run", TOY, "--run-dir", str(rd), "--no-tracking", *ARGS])
    return outcome(rd)


def assert_identical(rd, reference):
    lines, s, state = outcome(rd)
    ref_lines, ref_s, ref_state = reference
    assert lines == ref_lines
    assert strip(s["final_metrics"]) == strip(ref_s["final_metrics"])
    assert s["eval"] == ref_s["eval"] and s["problem_steps"] == ref_s["problem_steps"]
    assert same_state(state["engine"], ref_state["engine"])


@pytest.mark.parametrize("fault,resumed_from", [
    ("kill-after-step:12", "step_00000007.pt"),          # between two checkpoints
    ("kill-in-checkpoint:14:tmp", "step_00000007.pt"),   # half of the file written
    ("kill-in-checkpoint:21:sidecar", "step_00000014.pt"),  # file renamed, checksum missing
])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, fault, resumed_from):
    rd = tmp_path / "run"
    r = mlomae(["run", TOY, "--run-dir", str(rd), "--no-tracking", *ARGS], fault=fault, check=False)
    assert r.returncode == -signal.SIGKILL
    r = mlomae(["run", "--resume", str(rd), "--no-tracking"])
    assert f"from {resumed_from}" in r.stderr
    if fault.endswith("sidecar"):
        assert "step_00000021.pt is unusable (no checksum file" in r.stderr
    assert_identical(rd, reference)


def test_sigterm_checkpoints_and_resume_continues_the_same_mlflow_run(tmp_path, reference, mlflow_uri):
    rd = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "mlomae", "run", TOY, "--run-dir", str(rd),
            f"tracking.uri={mlflow_uri}", *ARGS, "trainer.steps=600"]
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    # wait until training is under way (the first checkpoint exists), then ask it to stop
    import time
    deadline = time.time() + 300   # generous: a loaded machine takes long to import and start
    while not list((rd / "checkpoints").glob("*.pt")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list((rd / "checkpoints").glob("*.pt")), "no checkpoint within 300 s"
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "mlomae run --resume" in err
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "KILLED"
    stopped_at = s["outer_steps"]
    assert (rd / "checkpoints" / f"step_{stopped_at:08d}.pt").exists()
    run_id = json.loads((rd / "mlflow.json").read_text())["run_id"]
    mlomae(["run", "--resume", str(rd), "trainer.steps=600"])
    s2 = json.loads((rd / "summary.json").read_text())
    assert s2["status"] == "FINISHED" and s2["outer_steps"] == 600 and s2["mlflow_run_id"] == run_id
    from mlflow.tracking import MlflowClient
    hist = MlflowClient(mlflow_uri).get_metric_history(run_id, "hyper/loss")
    assert [m.step for m in hist] == list(range(5, 601, 5))  # each record delivered once


def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    rd = tmp_path / "run"
    mlomae(["run", TOY, "--run-dir", str(rd), "--no-tracking", *ARGS], fault="kill-after-step:23",
           check=False)
    bad = rd / "checkpoints" / "step_00000021.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = mlomae(["run", "--resume", str(rd), "--no-tracking"])
    assert "step_00000021.pt is unusable (checksum mismatch" in r.stderr
    assert "resuming from" in r.stderr and "step_00000014.pt" in r.stderr
    assert_identical(rd, reference)


def test_resume_rejects_another_experiments_checkpoint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    mlomae(["run", TOY, "--run-dir", str(a), "--no-tracking", "trainer.steps=7",
            "trainer.checkpoint_every=7"])
    mlomae(["run", TOY, "--run-dir", str(b), "--no-tracking", "trainer.steps=7",
            "trainer.checkpoint_every=7", "problems.hyper.optimizer.lr=0.5"])
    for f in (b / "checkpoints").iterdir():
        f.unlink()
    for f in (a / "checkpoints").iterdir():
        (b / "checkpoints" / f.name).write_bytes(f.read_bytes())
    r = mlomae(["run", "--resume", str(b), "--no-tracking"], check=False)
    assert r.returncode == 2 and "belongs to another experiment" in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_keeps_results_added_after_the_run(tmp_path):
    """A result `mlomae eval` merged into summary.json after the run stopped survives a resume
    that trains further; the summary also separates training time from the whole wall time."""
    from mlomae.eval.rundir import merge_summary
    rd = tmp_path / "run"
    mlomae(["run", TOY, "--run-dir", str(rd), "--no-tracking", "trainer.steps=7",
            "trainer.checkpoint_every=7"])
    merge_summary(rd, "eval", {"added_later": 12.5})
    mlomae(["run", "--resume", str(rd), "--no-tracking", "trainer.steps=14"])
    s = json.loads((rd / "summary.json").read_text())
    assert s["outer_steps"] == 14 and s["eval"]["added_later"] == 12.5
    assert 0 < s["train_seconds"] <= s["wall_time_seconds"]


def _head() -> str | None:
    """This checkout's commit as git itself prints it (None outside a git checkout)."""
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0 or not (ROOT / ".git").exists():
        return None
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip()[:12] + ("+dirty" if dirty else "")


@pytest.mark.parametrize("saved,expected_before", [(["0123456789ab"], ["0123456789ab"]),
                                                   (None, [None])])
def test_summary_names_every_commit_that_trained_the_run(tmp_path, saved, expected_before):
    """A run records the commit it started from; a resume by other code appends its own, and a
    checkpoint from before commits were kept reads as one unknown (None) commit."""
    from mlomae import checkpoint
    rd = tmp_path / "run"
    mlomae(["run", TOY, "--run-dir", str(rd), "--no-tracking", "trainer.steps=7",
            "trainer.checkpoint_every=7"])
    head = _head()
    assert json.loads((rd / "summary.json").read_text())["code"] == [head]
    path, state = checkpoint.load_latest(rd / "checkpoints")
    if saved is None:
        del state["code"]
    else:
        state["code"] = saved
    checkpoint.save(rd / "checkpoints", 7, state, keep=3)
    mlomae(["run", "--resume", str(rd), "--no-tracking", "trainer.steps=14"])
    assert json.loads((rd / "summary.json").read_text())["code"] == [*expected_before, head]
    again = checkpoint.load_latest(rd / "checkpoints")[1]
    assert again["code"] == [*expected_before, head]
