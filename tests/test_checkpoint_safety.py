"""Checkpoints load with weights_only: one crafted to run code is refused and the code never
runs; checkpoints of the earlier format (numpy's random state as an array) still load."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlomae import checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write(directory: Path, step: int, obj) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    path.write_bytes(data)
    path.with_suffix(".pt.sha256").write_text(hashlib.sha256(data).hexdigest())  # intact
    return path


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    write(tmp_path / "checkpoints", 1, {"engine": {}, "x": Payload(marker)})
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="refused: loading it would run code"):
        checkpoint.load_latest(tmp_path / "checkpoints")
    assert not marker.exists()


def test_the_cli_refuses_it_with_exit_2(tmp_path):
    """A finished run's newest checkpoint swapped for a hostile one: `mlomae eval` exits 2 with
    the message, no traceback, and the payload does not run."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mlomae", "run", str(ROOT / "experiments/toy_bilevel.yaml"),
                        "trainer.steps=2", "trainer.checkpoint_every=2", "--no-tracking",
                        "--run-dir", str(run)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    marker = tmp_path / "ran"
    write(run / "checkpoints", 99, {"engine": Payload(marker)})
    r = subprocess.run([sys.executable, "-m", "mlomae", "run", "--resume", str(run)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_the_earlier_format_still_loads_and_the_current_one_is_plain(tmp_path):
    """The earlier format kept numpy's random state as np.random.get_state(); the current
    one keeps tensors and numbers, and set_rng_state restores numpy's stream from either."""
    np.random.seed(3)
    old = {"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, (1,) * 625, None)}}
    path = write(tmp_path, 1, old)
    got = checkpoint.load(path)
    np.testing.assert_array_equal(got["rng"]["numpy"][1], old["rng"]["numpy"][1])
    np.random.seed(3)
    expected = np.random.rand(3)
    np.random.seed(3)
    state = checkpoint.rng_state()
    assert isinstance(state["numpy"]["keys"], torch.Tensor)
    torch.load(write(tmp_path, 2, state), weights_only=True)   # no allow-list needed
    np.random.rand(5)
    checkpoint.set_rng_state(state)
    np.testing.assert_array_equal(np.random.rand(3), expected)
