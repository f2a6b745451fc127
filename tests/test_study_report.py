"""The study's report: the paired table is each method minus random masking on the same seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_study():
    spec = importlib.util.spec_from_file_location("run_study", ROOT / "benchmarks/study/run_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(seed, linear, minutes):
    return {"seed": seed, "eval": {"linear_top1": linear, "linear_pixels_top1": 80.0},
            "train_minutes": minutes}


def test_paired_differences_match_seeds_and_skip_unpaired_ones():
    rs = load_run_study()
    rs.STUDY["methods"] = {"mae_random": {}, "mlomae": {}}
    rows = {"mae_random": [run(0, 85.0, 10.0), run(1, 84.0, 10.0)],
            # seed 2 has no random-mask partner yet: left out
            "mlomae": [run(0, 86.0, 20.0), run(1, 84.0, 30.0), run(2, 99.0, 1.0)]}
    table = rs.paired(rows, {"linear_top1": "linear", "linear_pixels_top1": "raw pixels"})
    line = [x for x in table.splitlines() if x.startswith("| mlomae |")][0]
    # differences +1.0 and 0.0: mean +0.50, sample std 0.71; time ratios 2 and 3: 2.50 ± 0.71
    assert line == "| mlomae | 2 | +0.50 ± 0.71 | 2.50 ± 0.71 |"
    assert "raw pixels" not in table
