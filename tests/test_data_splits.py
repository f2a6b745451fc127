"""Split specs: every expected count below is worked out by hand in the comment next to it."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from mlomae.data import (SplitSpec, base_permutation, load_split_indices, parse_split,
                         resolve_splits, save_split_indices)
from mlomae.errors import ConfigError

N = 1000
LABELS = np.arange(N) % 10  # 100 items of each of 10 classes
DATA = {"train": LABELS, "test": np.arange(200) % 10}


def resolve(specs, **kw):
    return resolve_splits(specs, DATA, seed=kw.pop("seed", 0), **kw)


def test_parse_forms():
    assert parse_split("train") == SplitSpec("train", text="train")
    s = parse_split("train[:80%]@balanced:10%")
    assert (s.source, s.start, s.stop, s.labels_per_class) == ("train", None, Fraction(4, 5),
                                                               Fraction(1, 10))
    assert parse_split("train[1000:2000]").start == 1000
    assert parse_split("train[0.5:]").start == Fraction(1, 2)
    assert parse_split("train@balanced:100").labels_per_class == 100
    d = parse_split({"from": "train", "range": [0.0, 0.8], "labels_per_class": 0.1})
    assert (d.start, d.stop, d.labels_per_class) == (0, Fraction(4, 5), Fraction(1, 10))
    assert parse_split({"from": "train", "indices": "a.npy"}).indices == "a.npy"


def test_80_20_slices_are_complementary_and_follow_the_seeded_permutation():
    idx = resolve({"finetune": "train[:80%]", "mask": "train[80%:]"})
    perm = base_permutation(N, "train", 0)
    assert np.array_equal(idx["finetune"], perm[:800])  # round(0.8 * 1000) = 800
    assert np.array_equal(idx["mask"], perm[800:])
    assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(N))
    again = resolve({"finetune": "train[:80%]"})
    other = resolve({"finetune": "train[:80%]"}, seed=1)
    assert np.array_equal(again["finetune"], idx["finetune"])
    assert not np.array_equal(other["finetune"], idx["finetune"])


def test_counts_and_exact_fraction_boundaries():
    idx = resolve({"a": "train[100:250]", "b": {"from": "train", "range": [0.0, 0.29]}})
    assert np.array_equal(idx["a"], base_permutation(N, "train", 0)[100:250])
    # 0.29 * 1000 is 289.99999999999997 in floating point; the boundary must still be 290.
    assert idx["b"].size == 290


def test_balanced_fraction_gives_the_hand_computed_count_per_class():
    labels = np.repeat([0, 1, 2], [10, 25, 3])  # classes of 10, 25 and 3 items
    out = resolve_splits({"finetune": "train@balanced:10%"}, {"train": labels}, seed=3)
    # per class max(1, floor(0.1 * n + 1/2)): 10 -> 1, 25 -> floor(3.0) = 3, 3 -> max(1, 0) = 1
    assert np.bincount(labels[out["finetune"]]).tolist() == [1, 3, 1]
    out = resolve_splits({"finetune": "train@balanced:2"}, {"train": labels}, seed=3)
    assert np.bincount(labels[out["finetune"]]).tolist() == [2, 2, 2]
    with pytest.raises(ConfigError, match="wants 5 items of class 2"):
        resolve_splits({"finetune": "train@balanced:5"}, {"train": labels}, seed=3)


def test_balanced_takes_the_first_items_of_each_class_in_permuted_order():
    idx = resolve({"mask": "train[80%:]@balanced:10%", "all": "train[80%:]"})
    pool = idx["all"]  # 200 items; 100 per class overall, so the count per class varies here
    for c in range(10):
        members = pool[LABELS[pool] == c]
        k = max(1, int(np.floor(0.1 * members.size + 0.5)))
        assert np.array_equal(idx["mask"][LABELS[idx["mask"]] == c], members[:k])


def test_overlapping_finetune_and_mask_rejected_naming_both_and_the_count():
    with pytest.raises(ConfigError) as e:
        resolve({"finetune": "train[:80%]", "mask": "train[70%:]"})
    msg = str(e.value)
    # finetune = positions 0..799, mask = 700..999 of the same permutation: 100 shared.
    assert "'finetune' (train[:80%])" in msg and "'mask' (train[70%:])" in msg
    assert "share 100 items" in msg


def test_disjoint_roles_are_the_callers_choice():
    specs = {"finetune": "train[:50%]", "mask": "train[50%:]", "val": "train[40%:60%]"}
    resolve(specs)  # val is not in the default (finetune, mask)
    with pytest.raises(ConfigError, match=r"'finetune' \(train\[:50%\]\) and 'val'.*share 100"):
        resolve(specs, disjoint=("finetune", "mask", "val"))
    resolve({"finetune": "train", "mask": "train"}, disjoint=())


def test_pretraining_may_share_items_with_labeled_roles():
    idx = resolve({"pretrain": "train", "finetune": "train[:80%]", "mask": "train[80%:]"})
    assert idx["pretrain"].size == N


@pytest.mark.parametrize("role", ["pretrain", "finetune", "mask", "probe_val"])
def test_only_the_test_role_reads_the_test_split(role):
    with pytest.raises(ConfigError) as e:
        resolve({role: "test[:50%]", "test": "test"})
    assert f"role '{role}' reads the test split" in str(e.value)
    assert e.value.key == f"data.splits.{role}"
    assert resolve({"test": "test"})["test"].size == 200
    assert resolve({"eval": "test"}, test_roles=("eval",))["eval"].size == 200


@pytest.mark.parametrize("spec,match", [
    ("train[:120%]", "out of range"),
    ("train[80%:20%]", "'bad' = 'train\\[80%:20%\\]' is empty or out of order"),
    ("train[5:5]", "'bad' = 'train\\[5:5\\]' is empty or out of order"),
    ("train[0:2000]", "reaches item 2000 but 'train' has 1000 items"),
    ("train@balanced:0%", "labels per class"),
    ("train@balanced:150%", "out of range"),
    ({"from": "train", "labels_per_class": 1.5}, "out of range"),
    ({"from": "train", "range": [0.9, 0.1]}, "empty or out of order"),
    ({"from": "train", "range": [0, 1], "indices": "x.npy"}, "either 'range' or 'indices'"),
    ({"from": "train", "fraction": 0.5}, "unknown split key"),
    ("valid[:10%]", "base split 'valid', which does not exist"),
    ("train[:ten]", "count .* percentage"),
    ("train(0:10)", "cannot read split spec"),
])
def test_bad_specs_rejected_naming_the_split(spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve({"bad": spec})
    assert e.value.key == "data.splits.bad"


def test_index_files(tmp_path):
    np.save(tmp_path / "ft.npy", np.array([5, 3, 9]))
    (tmp_path / "mask.txt").write_text("1\n2\n4\n")
    idx = resolve({"finetune": {"from": "train", "indices": str(tmp_path / "ft.npy")},
                   "mask": {"from": "train", "indices": str(tmp_path / "mask.txt")}})
    assert idx["finetune"].tolist() == [5, 3, 9]  # as written: index files are not permuted
    assert idx["mask"].tolist() == [1, 2, 4]
    (tmp_path / "dup.txt").write_text("1 1\n")
    np.save(tmp_path / "far.npy", np.array([1, N]))
    for f, match in (("dup.txt", "repeats"), ("far.npy", "outside 0..999"), ("no.npy", "not found")):
        with pytest.raises(ConfigError, match=match):
            resolve({"mask": {"from": "train", "indices": str(tmp_path / f)}})
    (tmp_path / "overlap.txt").write_text("3\n7\n")
    with pytest.raises(ConfigError, match="share 1 items"):
        resolve({"finetune": {"from": "train", "indices": str(tmp_path / "ft.npy")},
                 "mask": {"from": "train", "indices": str(tmp_path / "overlap.txt")}})


def test_save_and_load_split_indices(tmp_path):
    specs = {"finetune": "train[:80%]", "mask": "train[80%:]@balanced:10%"}
    idx = resolve(specs)
    save_split_indices(tmp_path / "run", idx, specs=specs, seed=0)
    back = load_split_indices(tmp_path / "run")
    assert set(back) == {"finetune", "mask"}
    assert all(np.array_equal(back[k], idx[k]) for k in idx)
    info = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert info["seed"] == 0 and info["roles"]["finetune"]["size"] == 800
    assert info["roles"]["mask"]["spec"] == "train[80%:]@balanced:10%"
