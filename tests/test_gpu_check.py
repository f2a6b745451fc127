"""benchmarks/gpu_check.py's dry run (the CPU, tiny sizes) runs every code path of the GPU
check, so the script cannot rot between GPU runs: its JSON has every section, and every
counted step equals the requested one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_every_section_with_the_requested_counts(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "DRY RUN (--dry-run)" in r.stdout and "machine: " in r.stdout
    assert "| MLO-MAE cycle fp32" in r.stdout     # the table is printed
    res = json.loads(out.read_text())
    assert {"machine", "gpu", "dry_run", "dry_run_reason", "device", "sizes", "cuda_tests",
            "torchrun", "throughput", "mlomae_cycle", "table", "seconds"} <= set(res)
    assert res["dry_run"] is True and res["device"] == "cpu"
    steps = res["sizes"]["steps"]
    assert steps == 2 and res["sizes"]["batch"] == 2 and res["sizes"]["img"] == 32

    t = res["cuda_tests"]   # hidden from the GPU in a dry run: every test says it skipped
    assert t["tests"] > 0 and t["skipped"] == t["tests"] and t["failed"] == 0
    assert any("no CUDA device" in reason for reason in t["skip_reasons"])

    assert [r["experiment"] for r in res["torchrun"]] == ["toy_bilevel", "quickstart"]
    for run in res["torchrun"]:
        assert run["returncode"] == 0 and run["backend"] == "gloo" and run["status"] == "FINISHED"
        assert run["outer_steps"] == run["requested_steps"] == steps
        assert run["problem_steps"] == run["expected_problem_steps"]
    # toy: regression 5 steps per hyper step; quickstart: pretrain 4 / finetune 1 / mask 1
    assert res["torchrun"][0]["expected_problem_steps"] == {"regression": 10, "hyper": 2}
    assert res["torchrun"][1]["expected_problem_steps"] == {"pretrain": 8, "finetune": 2, "mask": 2}

    assert [r["precision"] for r in res["throughput"]] == ["fp32", "bf16"]
    for r in res["throughput"]:
        assert r["counted_steps"] == {"hand": steps, "engine": steps}
        assert r["requested_steps"] == steps
        assert set(r["images_per_s"]) == {"hand", "engine"}
        assert all(v > 0 for v in r["images_per_s"].values())
    for r in res["mlomae_cycle"]:
        assert "error" not in r, r.get("error")
        assert r["method"] == "darts" and r["batch"] == 2
        assert r["counted_steps"] == r["requested_steps"] == steps
        assert r["schedule"] == ["pretrain", "pretrain", "finetune", "mask"]
        assert r["problem_steps"] == r["expected_problem_steps"] == \
            {"pretrain": 2 * steps, "finetune": steps, "mask": steps}
        assert r["median_cycle_s"] > 0 and r["peak_growth_mb"] >= 0
    header, rows = res["table"]["header"], res["table"]["rows"]
    assert header[0] == "check" and len(rows) == 1 + 2 + 2 + 2
