"""Two processes under torchrun (gloo, CPU) with batch b reach the same parameters as one
process with batch 2b, for an implicit method, for unroll (whose recorded steps average
their gradients differentiably) and for DARTS, finite-difference and exact (on the recorded
step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")


def final_params(rd: Path) -> dict:
    state = torch.load(rd / "checkpoints" / "step_00000012.pt", weights_only=False)
    return {n: p["module"] for n, p in state["engine"]["problems"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "unroll", "darts", "darts_exact"])
def test_two_processes_equal_one_with_double_batch(tmp_path, method):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--no-tracking", "trainer.steps=12", "trainer.checkpoint_every=12",
              f"hypergrad.method={method.removesuffix('_exact')}", "trainer.threads=1"]
    if method == "darts_exact":   # the lower's recorded step: local graph, averaged push
        common.append("+hypergrad.exact=true")
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "mlomae", "run", TOY, "--run-dir", str(one),
                        "data.batch_size=64", *common], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "mlomae", "run", TOY, "--run-dir", str(two),
                        "data.batch_size=32", *common], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_params(one), final_params(two)
    for prob in a:
        for k in a[prob]:
            torch.testing.assert_close(b[prob][k], a[prob][k], rtol=1e-5, atol=1e-6)
    # the learned penalties really moved from their initial -2 (so the hypergradient mattered)
    assert float((a["hyper"]["log_lam"] + 2.0).abs().max()) > 0.1
    # only rank 0 wrote the run directory: one metrics file, one summary
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
