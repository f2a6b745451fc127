"""Evaluation protocols as functions over tensors: linear probe, k-NN, fine-tune parameter groups,
spec checks and result names. Every number is a closed form or worked out by hand here."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlomae.errors import ConfigError
from mlomae.eval.features import balanced_subset
from mlomae.eval.finetune import FeatureClassifier, layer_id, lr_factor, param_groups
from mlomae.eval.knn import knn_predict, knn_scores
from mlomae.eval.linear import fit_linear, linear_probe
from mlomae.eval.spec import Labels, check_spec, parse_labels, result_name, unique_name
from mlomae.models.mae import MaskedAutoencoder


# -- linear probe ---------------------------------------------------------------------------

def test_linear_probe_separable_features_reach_100_percent():
    """Three classes at the corners of a simplex, noise far below the gap: a linear classifier
    separates them exactly, so test top-1 is 100% (not 'close to')."""
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.arange(300) % 3, torch.arange(150) % 3
    x_tr = 3 * F.one_hot(y_tr, 3).float() + 0.1 * torch.randn(300, 3, generator=g)
    x_te = 3 * F.one_hot(y_te, 3).float() + 0.1 * torch.randn(150, 3, generator=g)
    assert linear_probe(x_tr, y_tr, x_te, y_te, 3) == 100.0
    assert linear_probe(x_tr, y_tr, x_te, y_te, 3, standardize=False, weight_decay=0.0) == 100.0


def test_linear_probe_reaches_the_optimum_of_its_objective():
    """On overlapping classes L-BFGS must stop at the regularised optimum: the gradient of
    mean CE + wd/2 ||W||^2 vanishes there (first-order optimality of a strictly convex loss)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] + 0.8 * torch.randn(400, generator=g) > 0).long() + (x[:, 1] > 1).long()
    wd = 1e-2
    clf = fit_linear(x, y, 3, weight_decay=wd, max_iter=500)
    w = clf.weight.clone().requires_grad_(True)
    b = clf.bias.clone().requires_grad_(True)
    z = (x - clf.mean) / clf.std
    loss = F.cross_entropy(z @ w + b, y) + 0.5 * wd * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert max(gw.abs().max().item(), gb.abs().max().item()) < 1e-4
    # standardisation uses the train statistics: population std, mean over the train rows
    torch.testing.assert_close(clf.mean, x.mean(0))
    torch.testing.assert_close(clf.std, x.std(0, unbiased=False))


# -- k-NN -------------------------------------------------------------------------------------

# Train features (2-D) and labels; the test point q = (1, 0.1).
#   a = (1, 0)  class 0   cos(q, a) = 1 / sqrt(1.01)                 = 0.99504
#   b = (0, 1)  class 1   cos(q, b) = 0.1 / sqrt(1.01)               = 0.09950
#   c = (1, 1)  class 1   cos(q, c) = 1.1 / (sqrt(1.01) sqrt(2))     = 0.77395
#   d = (-1, 0) class 2   cos(q, d) = -0.99504
# k = 3 keeps a, c, b. Majority: class 1 has 2 votes, class 0 one -> 1.
# Weighted (T = 0.07): class 0 = e^(0.99504/0.07) = 1.49e6, class 1 = e^(0.77395/0.07) +
# e^(0.09950/0.07) = 6.3e4 + 4.1 -> 0. The one close neighbour outweighs two far ones.
TRAIN_X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
TRAIN_Y = torch.tensor([0, 1, 1, 2])
Q = torch.tensor([[1.0, 0.1]])


def test_knn_weighted_scores_by_hand():
    s_a, s_b, s_c = 1 / math.sqrt(1.01), 0.1 / math.sqrt(1.01), 1.1 / (math.sqrt(1.01) * math.sqrt(2))
    T = 0.07
    want = torch.tensor([[math.exp(s_a / T), math.exp(s_c / T) + math.exp(s_b / T), 0.0]])
    got = knn_scores(TRAIN_X, TRAIN_Y, Q, 3, k=3, temperature=T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert knn_predict(TRAIN_X, TRAIN_Y, Q, 3, k=3, temperature=T).tolist() == [0]


def test_knn_majority_vote_and_ties_by_hand():
    assert knn_scores(TRAIN_X, TRAIN_Y, Q, 3, k=3, vote="majority").tolist() == [[1.0, 2.0, 0.0]]
    assert knn_predict(TRAIN_X, TRAIN_Y, Q, 3, k=3, vote="majority").tolist() == [1]
    # k = 2: a (class 0) and c (class 1), one vote each: the tie goes to the lower class, 0
    assert knn_predict(TRAIN_X, TRAIN_Y, Q, 3, k=2, vote="majority").tolist() == [0]
    # a high temperature flattens the weights towards majority: e^(0.0995) + e^(0.0774) > e^(0.0995)
    assert knn_predict(TRAIN_X, TRAIN_Y, Q, 3, k=3, temperature=10.0).tolist() == [1]


def test_knn_is_scale_invariant_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(2)
    xtr, ytr = torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g)
    xte = torch.randn(50, 8, generator=g)
    a = knn_scores(xtr, ytr, xte, 4, k=7)
    torch.testing.assert_close(knn_scores(5 * xtr, ytr, 0.1 * xte, 4, k=7, chunk=7), a,
                               rtol=1e-4, atol=0)


# -- fine-tune ----------------------------------------------------------------------------------

def test_layer_decay_groups_follow_block_depth():
    """depth 2, decay d: embeddings d^3, blocks.0 d^2, blocks.1 d, final norm and head 1; no
    weight decay on biases, norms and the class token."""
    mae = MaskedAutoencoder(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2,
                            num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    clf = FeatureClassifier(mae, 16, 3)
    groups = param_groups(clf, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(clf.named_parameters())
    want = {"encoder.cls_token": (0.125, 0.0), "encoder.patch_embed.proj.weight": (0.125, 0.05),
            "encoder.blocks.0.attn.qkv.weight": (0.25, 0.05), "encoder.blocks.0.norm1.bias": (0.25, 0.0),
            "encoder.blocks.1.mlp.fc2.weight": (0.5, 0.05), "encoder.norm.weight": (1.0, 0.0),
            "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0)}
    for n, (scale, wd) in want.items():
        g = where[id(named[n])]
        assert (g["lr_scale"], g["weight_decay"]) == (scale, wd), n
    assert layer_id("blocks.11.attn.qkv.weight", 12) == 12 and layer_id("fc_norm.weight", 12) == 13
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_lr_schedule_warmup_then_cosine():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)         # halfway through the cosine
    assert lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)


# -- specs, names, label fractions ---------------------------------------------------------

def test_balanced_subset_rule():
    """Per class: the first max(1, floor(f n_c + 1/2)) items in the given order."""
    labels = np.array([0] * 25 + [1] * 4 + [2] * 1)
    order = np.arange(30)[::-1].copy()
    got = balanced_subset(order, labels, Labels(Fraction(1, 10), "10%"))
    # class 0: floor(2.5 + .5) = 3 of 25; class 1: max(1, floor(0.9)) = 1; class 2: 1
    assert got.tolist() == [29, 28, 24, 23, 22]
    assert balanced_subset(order, labels, Labels(Fraction(1), "100%")) is order


def test_check_spec_defaults_and_names():
    s = check_spec({"protocol": "linear"})
    assert (s["train"], s["test"], s["pool"], s["labels"].fraction) == ("finetune", "test", "mean", 1)
    assert result_name(s, "mae") == "linear_top1"
    assert result_name(check_spec({"protocol": "linear", "labels": "10%"}), "mae") == "linear_top1_10pct"
    assert result_name(check_spec({"protocol": "knn", "labels": "1%", "model": "mae"}), "mae") == "knn_top1_1pct"
    assert result_name(check_spec({"protocol": "linear", "model": "pixels"}), "mae") == "linear_pixels_top1"
    assert result_name(check_spec({"protocol": "linear", "pool": "cls"}), "mae") == "linear_cls_top1"
    assert result_name(check_spec({"protocol": "finetune", "labels": "0.5%"}), "mae") == "finetune_top1_0.5pct"
    assert result_name(check_spec({"protocol": "knn", "name": "mine"}), "mae") == "mine"
    # another test role is in the name, so it never replaces the test split's number
    assert result_name(check_spec({"protocol": "linear", "test": "mask"}), "mae") == "linear_mask_top1"
    assert result_name(check_spec({"protocol": "linear", "model": "pixels", "test": "mask"}),
                       "mae") == "linear_pixels_mask_top1"
    assert result_name(check_spec({"protocol": "knn", "test": "test", "labels": "10%"}),
                       "mae") == "knn_top1_10pct"
    assert check_spec({"protocol": "finetune", "lr": "3e-3"})["lr"] == 0.003   # YAML's 3e-3 string
    specs = [{"protocol": "knn"}, {"protocol": "knn", "k": 5}, {"protocol": "linear"}]
    assert [unique_name(specs, i, "mae") for i in range(3)] == ["knn_top1", "knn_top1_1", "linear_top1"]
    import re
    for name in ("linear_top1_10pct", "finetune_top1_0.5pct", "linear_pixels_top1"):
        assert re.fullmatch(r"[/\w.\- :]*", name)   # MLflow's rule for metric names


@pytest.mark.parametrize("spec, key, words", [
    ({"protocol": "linaer"}, "evaluation[3].protocol", "unknown evaluation protocol"),
    ({"protocol": "knn", "kk": 3}, "evaluation[3].kk", "did you mean 'k'"),
    ({"protocol": "knn", "k": 0}, "evaluation[3].k", "must be >= 1"),
    ({"protocol": "knn", "temperature": 0}, "evaluation[3].temperature", "must be > 0"),
    ({"protocol": "linear", "labels": "3"}, "evaluation[3].labels", "percentage"),
    ({"protocol": "linear", "labels": "0%"}, "evaluation[3].labels", "percentage"),
    ({"protocol": "linear", "labels": "150%"}, "evaluation[3].labels", "percentage"),
    ({"protocol": "linear", "pool": "max"}, "evaluation[3].pool", "one of mean, cls"),
    ({"protocol": "finetune", "epochs": 1.5}, "evaluation[3].epochs", "integer"),
    ({"protocol": "finetune", "layer_decay": 1.5}, "evaluation[3].layer_decay", "<= 1"),
    ({"protocol": "linear", "epochs": 3}, "evaluation[3].epochs", "not an option of protocol 'linear'"),
    ("linear", "evaluation[3]", "mapping with a 'protocol'"),
])
def test_check_spec_errors_name_the_key(spec, key, words):
    with pytest.raises(ConfigError) as e:
        check_spec(spec, file="exp.yaml", key="evaluation[3]")
    assert e.value.key == key and e.value.file == "exp.yaml"
    assert words in str(e.value)


def test_parse_labels_forms():
    assert parse_labels("10%").fraction == Fraction(1, 10)
    assert parse_labels(" 1 %").fraction == Fraction(1, 100)
    assert parse_labels(0.25).fraction == Fraction(1, 4)
    assert parse_labels(1).fraction == 1
    with pytest.raises(ConfigError):
        parse_labels(10)   # ten what? a count is not a share


def test_check_evaluation_fails_before_training_on_any_bad_key():
    from mlomae.config import Config
    from mlomae.eval import check_evaluation
    good = [{"protocol": "problem", "problem": "finetune"}, {"protocol": "knn", "k": 5}]
    check_evaluation(Config({"evaluation": good}, "exp.yaml"))
    with pytest.raises(ConfigError) as e:
        check_evaluation(Config({"evaluation": good + [{"protocol": "knn", "vote": "loud"}]}, "exp.yaml"))
    assert (e.value.file, e.value.key) == ("exp.yaml", "evaluation[2].vote")


def test_linear_fit_tolerance_stops_on_chunk_boundaries():
    """tol 0 is one L-BFGS call of max_iter iterations (the old fit, bit for bit); with tol the
    fit runs in chunks of CHUNK iterations and stops after the first chunk whose loss decreased
    by less than tol relative to the loss reached, as read off the chunked trajectory by hand."""
    from mlomae.eval.linear import CHUNK, fit_linear
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    y = (x[:, :3] + 0.3 * torch.randn(300, 3, generator=g)).argmax(1)
    z = (x - x.mean(0)) / x.std(0, unbiased=False)

    def lbfgs(max_iter):
        w = torch.zeros(12, 3, requires_grad=True)
        b = torch.zeros(3, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-10,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 0.5e-4 * (w * w).sum()
            loss.backward()
            return loss
        return w, b, lambda: float(opt.step(closure))

    plain = fit_linear(x, y, 3, max_iter=37)
    w, b, step = lbfgs(37)
    step()
    assert torch.equal(plain.weight, w.detach()) and torch.equal(plain.bias, b.detach())
    tol, losses = 1e-3, []
    w, b, step = lbfgs(CHUNK)
    while True:
        losses.append(step())
        if len(losses) > 1 and (losses[-2] - losses[-1]) / losses[-1] < tol:
            break
    got = fit_linear(x, y, 3, max_iter=500, tol=tol)
    assert len(losses) >= 3 and torch.equal(got.weight, w.detach()) and torch.equal(got.bias, b.detach())
