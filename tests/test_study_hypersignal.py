"""benchmarks/study/hypersignal.py: the hypergradient's signal share, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from study_scripts import load_study_script


def load_signal():
    return load_study_script("hypersignal")


def test_signal_share_by_hand():
    s = load_signal().signal_stats(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # dots: |g|^2 = 4, 1, 2 (mean 7/3); g1.g2 = 0, g1.g3 = 2, g2.g3 = 1 (mean over i != j: 1)
    assert s["signal_share"] == pytest.approx(3 / 7, abs=1e-15)
    assert s["batches_to_half_signal"] == pytest.approx(4 / 3, abs=1e-15)
    # cosines: (1,2) 0, (1,3) 1/sqrt2, (2,3) 1/sqrt2; successive: (1,2), (2,3)
    assert s["pairwise_cosine"] == pytest.approx(2 / 3 / math.sqrt(2), abs=1e-15)
    assert s["successive_cosine"] == pytest.approx(1 / 2 / math.sqrt(2), abs=1e-15)
    # halves: mean of row 1 = (2, 0), of rows 2-3 = (0.5, 1): dot 1, norms 2 and sqrt(1.25)
    assert s["split_half_cosine"] == pytest.approx(1 / (2 * math.sqrt(1.25)), abs=1e-15)
    assert s["mean_norm"] == pytest.approx((2 + 1 + math.sqrt(2)) / 3, abs=1e-15)
    # squared norms 4, 1, 2: the first carries 4/7 of their sum
    assert s["top_batch_share"] == pytest.approx(4 / 7, abs=1e-15)
    # g^T g = [[5, 1], [1, 2]]: eigenvalues (7 +- sqrt 13) / 2 over the trace 7
    assert s["top_direction_share"] == pytest.approx((7 + math.sqrt(13)) / 14, abs=1e-14)


def test_top_direction_by_parameter():
    sig = load_signal()
    # nearly one axis, its sign flipping: along the third entry (parameter "b")
    g = torch.tensor([[0.0, 0.0, 3.0], [0.1, 0.0, -2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    shares = sig.top_direction(g, [("a", 2), ("b", 1)])
    assert list(shares) == ["b", "a"]
    # g^T g on entries (1, 3) = [[0.01, -0.2], [-0.2, 14]] (entry 2 is 0): its top eigenvalue
    # by the 2 x 2 formula, eigenvector (0.2 / (lam - 0.01), 1) up to scale
    t, d = 14.01, 0.01 * 14 - 0.04
    lam = t / 2 + math.sqrt(t * t / 4 - d)
    a = (0.2 / (lam - 0.01)) ** 2
    assert shares["a"] == pytest.approx(a / (1 + a), abs=1e-12)
    assert shares["b"] == pytest.approx(1 / (1 + a), abs=1e-12)
    assert sig.signal_stats(g)["top_direction_share"] == pytest.approx(lam / t, abs=1e-12)
    with pytest.raises(ValueError, match="add up to 2"):
        sig.top_direction(g, [("a", 2)])


def test_per_batch_record_by_hand():
    pb = load_signal().per_batch(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert pb["norms"] == [2.0, 1.0, 1.414]
    r = 0.7071   # 1/sqrt2 to 4 significant digits
    assert pb["cosines"] == [[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]]


def test_signal_share_extremes():
    sig = load_signal()
    same = sig.signal_stats(torch.tensor([[1.0, 2.0]] * 4))
    assert same["signal_share"] == pytest.approx(1.0, abs=1e-15)
    assert same["batches_to_half_signal"] == 0.0
    orthogonal = sig.signal_stats(torch.eye(3))
    assert orthogonal["signal_share"] == 0.0 and orthogonal["batches_to_half_signal"] == math.inf
    with pytest.raises(ValueError, match="at least two"):
        sig.signal_stats(torch.ones(1, 3))


def test_agreement_by_hand():
    # a = rows (1,0), (0,1); b = rows (1,1), (1,-1)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    s = load_signal().agreement(a, b)
    # per batch: cos((1,0),(1,1)) = 1/sqrt2, cos((0,1),(1,-1)) = -1/sqrt2
    assert s["batch_cosine"] == pytest.approx(0.0, abs=1e-15)
    # means (0.5, 0.5) and (1, 0): cosine 1/sqrt2
    assert s["mean_cosine"] == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    # i != j: a1.b2 = 1, a2.b1 = 1 -> 1; a1.a2 = 0 -> a's signal estimate 0: nan
    assert math.isnan(s["signal_cosine"])
    c = torch.tensor([[2.0, 0.0], [1.0, 1.0]])   # c1.c2 = 2
    d = torch.tensor([[1.0, 1.0], [3.0, 0.0]])   # d1.d2 = 3; c1.d2 = 6, c2.d1 = 2 -> 4
    assert load_signal().agreement(c, d)["signal_cosine"] == pytest.approx(4 / math.sqrt(6), abs=1e-15)
