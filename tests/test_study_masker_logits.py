"""benchmarks/study/masker_logits.py: where the sigmoid rounds to exactly 1 (its derivative, the
masker's only path from the weighted loss, then 0), and its summary of a hand-made logit batch."""

from __future__ import annotations

import math

import pytest
import torch
from study_scripts import load_study_script


def _module():
    return load_study_script("masker_logits")


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("float32", torch.float32)])
def test_saturation_thresholds_are_where_the_sigmoid_becomes_exactly_one(name, dtype):
    t = _module().SATURATES[name]   # ln 2**9 = 6.24 (bf16), ln 2**24 = 16.64 (float32)
    assert t == pytest.approx({"bf16": 9, "float32": 24}[name] * math.log(2))
    above = torch.sigmoid(torch.tensor(t + 0.1, dtype=dtype))
    below = torch.sigmoid(torch.tensor(t - 0.7, dtype=dtype))
    assert float(above) == 1.0
    assert float(below) < 1.0
    p = torch.sigmoid(torch.tensor(t + 0.1, dtype=dtype))
    assert float(p * (1 - p)) == 0.0   # no gradient through the weight


def test_report_on_a_hand_made_batch():
    z = torch.tensor([[30.0, 20.0, 5.0, 0.0, -3.0],
                      [30.0, 10.0, 7.0, -1.0, -20.0]])
    r = _module().report(z, k=3)   # masked: 30, 20, 5 and 30, 10, 7
    assert (r["min"], r["max"]) == (-20.0, 30.0)
    assert (r["masked_min"], r["masked_median"], r["masked_max"]) == (5.0, 10.0, 30.0)
    assert r["masked_saturated_bf16"] == pytest.approx(5 / 6)       # all but 5 exceed 6.24
    assert r["masked_saturated_float32"] == pytest.approx(3 / 6)    # 30, 20, 30 exceed 16.64
    assert r["masked_max_p1mp"] == pytest.approx(math.exp(5) / (1 + math.exp(5)) ** 2, rel=1e-5)  # 1 - p in float32
    # per-patch std across the two images, averaged over the 5 patches
    stds = [0.0, 10 / math.sqrt(2), 2 / math.sqrt(2), 1 / math.sqrt(2), 17 / math.sqrt(2)]
    assert r["std_across_images"] == pytest.approx(sum(stds) / 5, rel=1e-6)
