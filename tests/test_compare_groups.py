"""`mlomae compare --group-by`: groups, counts, and mean ± std equal to numpy's on hand-made
run records."""

from __future__ import annotations

import json

import numpy as np

from mlomae.compare import format_groups, group


def records():
    out = []
    for method, accs in (("darts", [80.0, 82.5, 81.0]), ("cg", [79.0, 83.0]), ("unroll", [84.0])):
        for seed, a in enumerate(accs):
            out.append({"params": {"hypergrad.method": method, "seed": str(seed)},
                        "metrics": {"eval/linear_top1": a, "mask/loss": a / 100},
                        "seconds": 10.0 + seed})
    return out


def test_groups_counts_and_moments_equal_numpys():
    rows = group(records(), ["hypergrad.method"], ["eval/linear_top1"])
    assert [r["hypergrad.method"] for r in rows] == ["darts", "cg", "unroll"]
    assert [r["runs"] for r in rows] == [3, 2, 1]
    for r, accs in zip(rows, ([80.0, 82.5, 81.0], [79.0, 83.0], [84.0])):
        mean, std, n = r["eval/linear_top1"]
        assert n == len(accs) and np.isclose(mean, np.mean(accs))
        assert np.isclose(std, np.std(accs, ddof=1) if len(accs) > 1 else 0.0)
    assert np.isclose(rows[0]["seconds"][0], np.mean([10.0, 11.0, 12.0]))


def test_formats():
    rows = group(records(), ["hypergrad.method"], ["eval/linear_top1"])
    md = format_groups(rows, "markdown").splitlines()
    assert md[0] == "| hypergrad.method | runs | eval/linear_top1 | seconds |"
    assert md[2].startswith("| darts | 3 | 81.17 ± 1.3 |")
    data = json.loads(format_groups(rows, "json"))
    assert data[1]["eval/linear_top1"]["n"] == 2 and np.isclose(data[1]["eval/linear_top1"]["std"],
                                                                np.std([79.0, 83.0], ddof=1))
    csv = format_groups(rows, "csv").splitlines()
    assert csv[0] == "hypergrad.method,runs,eval/linear_top1_mean,eval/linear_top1_std,seconds_mean,seconds_std"
    assert csv[3].startswith("unroll,1,84,0,")
