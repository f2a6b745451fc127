"""The registry, a user's npz arrays and the synthetic data sets (numbers worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlomae.data import DATASETS, build_dataset, make_loader, resolve_splits
from mlomae.errors import ConfigError, DataError


def test_registry_names_and_static_meta():
    assert {"fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder", "imagenet", "npz",
            "synthetic_regression", "synthetic_classification"} <= set(DATASETS)
    meta = DATASETS["cifar100"].meta
    assert (meta.num_classes, meta.channels, meta.image_size) == (100, 3, (32, 32))
    assert DATASETS["mnist"].meta.hflip is False  # a mirrored 2 is no 2
    assert DATASETS["fashion_mnist"].meta.hflip is True


def test_unknown_names_splits_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown dataset.*known: cifar10") as e:
        build_dataset("cifar11")
    assert e.value.key == "data.dataset"
    with pytest.raises(ConfigError, match="base split is 'train' or 'test'"):
        build_dataset("synthetic_regression", split="val")
    with pytest.raises(ConfigError, match="takes no option bogus") as e:
        build_dataset("synthetic_regression", bogus=1)
    assert e.value.key == "data.bogus" and "noise" in str(e.value)


def test_npz_channels_last_uint8_and_statistics(tmp_path):
    x_train = np.zeros((4, 2, 2, 3), np.uint8)
    x_train[..., 0] = 255  # red plane all 255, green 0, blue half 0 half 255
    x_train[:2, ..., 2] = 255
    np.savez(tmp_path / "data.npz", x_train=x_train, y_train=[0, 1, 2, 1],
             x_test=x_train[:1], y_test=[4])
    train = build_dataset("npz", root=tmp_path)
    test = build_dataset("npz", path=str(tmp_path / "data.npz"), split="test")
    assert train.images.shape == (4, 3, 2, 2) and len(test) == 1
    assert torch.equal(train.images[:, 0], torch.full((4, 2, 2), 255, dtype=torch.uint8))
    assert train.meta.num_classes == 5  # max label over both splits (4) + 1
    assert train.meta.mean == (1.0, 0.0, 0.5) and train.meta.std == (0.0, 0.0, 0.5)


def test_npz_aliases_grayscale_float_and_errors(tmp_path):
    f = tmp_path / "mine.npz"
    np.savez(f, train_images=np.full((3, 5, 5), 0.25, np.float32), train_labels=[0, 1, 0])
    ds = build_dataset("npz", root=f, num_classes=2)
    assert ds.images.shape == (3, 1, 5, 5) and ds.images.dtype == torch.float32
    assert ds.meta.mean == (0.25,) and ds[0][0].max().item() == 0.25
    with pytest.raises(DataError, match="no arrays for split 'test'.*train_images"):
        build_dataset("npz", root=f, split="test")
    with pytest.raises(DataError) as e:
        build_dataset("npz", root=tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "data.npz") in str(e.value)


def test_synthetic_regression_follows_its_formula():
    train = build_dataset("synthetic_regression", n=2000, dim=5, noise=0.1, seed=4)
    test = build_dataset("synthetic_regression", split="test", n=500, dim=5, noise=0.1, seed=4)
    assert train.x.shape == (2000, 5) and train.y.shape == (2000,) and train.y.dtype == torch.float32
    assert torch.equal(train.w_star, test.w_star) and not torch.equal(train.x[:500], test.x)
    resid = train.y - train.x @ train.w_star
    # residual = noise * N(0, 1): std 0.1, within 5% for 2000 draws (std error ~ 0.1 / sqrt(4000))
    assert resid.std().item() == pytest.approx(0.1, rel=0.05)
    # least squares recovers w*: error ~ 0.1 * sqrt(5 / 2000) = 0.005 per coordinate
    w_hat = torch.linalg.lstsq(train.x.double(), train.y.double()[:, None]).solution[:, 0]
    assert torch.allclose(w_hat.float(), train.w_star, atol=0.03)
    again = build_dataset("synthetic_regression", n=2000, dim=5, noise=0.1, seed=4)
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    x, y = next(make_loader(train, None, 64, seed=0))
    assert x.shape == (64, 5) and x.dtype == torch.float32 and y.shape == (64,)
    with pytest.raises(ConfigError, match="no class labels"):
        resolve_splits({"finetune": "train@balanced:10%"}, {"train": train}, seed=0)


def test_synthetic_classification_is_balanced_images():
    ds = build_dataset("synthetic_classification", n=1000, num_classes=10, image_size=16)
    assert ds.images.shape == (1000, 1, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.labels.bincount().tolist() == [100] * 10  # label = i mod 10 over 1000 items
    # the class prototype carries the signal: class means differ more than the noise level
    means = torch.stack([ds.images[ds.labels == c].float().mean(0) for c in range(10)]) / 255
    assert (means[0] - means[1]).abs().mean() > 0.05
    test = build_dataset("synthetic_classification", split="test", n=200, image_size=16)
    assert not torch.equal(test.images, ds.images[:200])


def test_load_data_builds_only_the_base_splits_read_and_resolves_roles(tmp_path):
    from mlomae.data import load_data, load_split_indices
    specs = {"pretrain": "train", "finetune": "train@balanced:10%", "mask": "train[80%:]"}
    data = load_data("synthetic_classification", specs, seed=0, n=500, image_size=8,
                     disjoint=())  # finetune (all of train) overlaps mask on purpose
    assert set(data.datasets) == {"train"} and data.meta.num_classes == 10
    assert data.sources == {"pretrain": "train", "finetune": "train", "mask": "train"}
    # 500 items = 50 per class; 10% of 50 = 5 per class
    ft = data.dataset("finetune").labels[data.indices["finetune"]]
    assert ft.bincount().tolist() == [5] * 10
    x, y = next(data.loader("mask", 25, seed=1))
    assert x.shape == (25, 1, 8, 8) and data.indices["mask"].size == 100  # 500 - round(0.8 * 500)
    data.save(tmp_path)
    assert np.array_equal(load_split_indices(tmp_path)["mask"], data.indices["mask"])
    with pytest.raises(ConfigError, match="no data split for role 'test'"):
        data.dataset("test")
    with pytest.raises(ConfigError, match="role 'mask' reads the test split"):
        load_data("synthetic_classification", {"mask": "test"}, seed=0, n=50)
