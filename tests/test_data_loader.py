"""Loaders (order, exact resume, sharding) and batch transforms.

Reference numbers: batch counts worked out by hand in the comments; resampling checked against
torch's own ``F.interpolate`` and ``torch.flip``; resumed runs against the uninterrupted run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mlomae.data import (DatasetMeta, TensorImageDataset, build_dataset, eval_transform,
                         make_loader, pretrain_transform)
from mlomae.errors import ConfigError

META = DatasetMeta("toy", 10, 1, (12, 12), (0.5,), (0.25,))


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 12, 12), generator=g, dtype=torch.uint8)
    return TensorImageDataset(images, torch.arange(37) % 10, META)


class ItemsOnly(Dataset):
    """The same data without ``gather``: forces the per-item DataLoader path."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v)
                                    for (x, u), (y, v) in zip(a, b))


def test_order_is_the_seeded_permutation_of_the_given_indices(toy):
    idx = np.arange(5, 37)  # 32 items
    loader = make_loader(toy, idx, 8, shuffle=True, seed=7)
    assert len(loader) == 4  # 32 / 8
    order = idx[np.random.default_rng([7, 0]).permutation(32)]
    assert np.array_equal(np.concatenate([loader.batch_indices(0, s) for s in range(4)]), order)
    x, y = next(loader)
    assert torch.equal(y, toy.labels[order[:8]])
    assert torch.equal(x, toy.images[order[:8]].float() / 255)  # no transform: float in [0, 1]
    plain = make_loader(toy, idx, 8, shuffle=False)
    assert np.array_equal(plain.batch_indices(3, 0), idx[:8])


def test_epochs_roll_over_and_state_counts_batches(toy):
    loader = make_loader(toy, None, 10, seed=1, drop_last=True)  # 37 items -> 3 batches
    assert len(loader) == 3
    take(loader, 2)
    assert loader.state_dict() == {"epoch": 0, "position": 2, "seed": 1}
    take(loader, 1)
    assert loader.state_dict() == {"epoch": 1, "position": 0, "seed": 1}
    assert len(list(loader.iter_epoch())) == 3 and loader.state_dict()["epoch"] == 2
    keep = make_loader(toy, None, 10, seed=1, drop_last=False)  # 3 x 10 + one batch of 7
    assert len(keep) == 4 and [b[1].numel() for b in keep.iter_epoch()] == [10, 10, 10, 7]


@pytest.mark.parametrize("items_only", [False, True])
def test_resume_replays_the_same_batches_with_augmentation(toy, items_only):
    ds = ItemsOnly(toy) if items_only else toy
    aug = pretrain_transform(META, 8)
    first = make_loader(ds, None, 5, seed=3, transform=aug)  # 7 batches per epoch
    take(first, 9)  # into the second epoch
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2, "seed": 3}
    expected = take(first, 10)  # crosses another epoch boundary
    resumed = make_loader(ds, None, 5, seed=0, transform=aug)  # seed comes from the state
    resumed.load_state_dict(state)
    assert same(take(resumed, 10), expected)
    # and the fast path and the per-item path give identical batches
    other = make_loader(toy if items_only else ItemsOnly(toy), None, 5, seed=3, transform=aug)
    other.load_state_dict(state)
    assert same(take(other, 10), expected)


def test_worker_processes_keep_the_order(toy):
    a = make_loader(ItemsOnly(toy), None, 4, seed=2, num_workers=2)
    b = make_loader(toy, None, 4, seed=2)
    assert same(take(a, 12), take(b, 12))  # 9 batches per epoch: crosses into epoch 1


def test_two_ranks_cover_the_global_batch_exactly(toy):
    aug = eval_transform(META, 12)
    whole = make_loader(toy, None, 16, seed=5, drop_last=True, transform=aug)
    ranks = [make_loader(toy, None, 8, seed=5, drop_last=True, transform=aug, rank=r, world_size=2)
             for r in (0, 1)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 2  # floor(37 / 16)
    for epoch in range(2):
        for step in range(2):
            parts = [r.batch_indices(epoch, step) for r in ranks]
            assert not set(parts[0]) & set(parts[1])
            assert np.array_equal(np.concatenate(parts), whole.batch_indices(epoch, step))
            (x0, y0), (x1, y1), (x, y) = next(ranks[0]), next(ranks[1]), next(whole)
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_sharded_short_last_batch():
    labels = torch.zeros(37, dtype=torch.long)
    ds = TensorImageDataset(torch.zeros(37, 1, 2, 2, dtype=torch.uint8), labels, META)
    ranks = [make_loader(ds, None, 8, seed=0, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    # 37 = 2 global batches of 16 + 5 left, split 3 / 2 over the two ranks
    assert len(ranks[0]) == 3
    assert [ranks[r].batch_indices(0, 2).size for r in (0, 1)] == [3, 2]
    seen = np.concatenate([ranks[r].batch_indices(0, s) for r in (0, 1) for s in range(3)])
    assert np.array_equal(np.sort(seen), np.arange(37))
    ds33 = TensorImageDataset(torch.zeros(33, 1, 2, 2, dtype=torch.uint8), labels[:33], META)
    # 33 = 2 x 16 + 1: one item cannot be shared by 2 ranks, so that last step is dropped
    assert len(make_loader(ds33, None, 8, drop_last=False, world_size=2)) == 2


def test_loader_argument_errors(toy):
    with pytest.raises(ConfigError, match="make no batch"):
        make_loader(toy, np.arange(5), 8, drop_last=True)
    with pytest.raises(ConfigError, match="rank"):
        make_loader(toy, None, 4, rank=2, world_size=2)
    loader = make_loader(toy, None, 4)
    with pytest.raises(ConfigError, match="position 99"):
        loader.load_state_dict({"epoch": 0, "position": 99, "seed": 0})


def test_crop_of_the_whole_image_is_plain_resampling(toy):
    x = toy.images[:4]
    full = pretrain_transform(META, 24, scale=(1, 1), ratio=(1, 1), hflip=False, normalize=False)
    g = torch.Generator().manual_seed(0)
    ref = F.interpolate(x.float() / 255, size=24, mode="bilinear", align_corners=False)
    assert torch.allclose(full(x, g), ref, atol=1e-5)  # box = the image, 2x bilinear upsampling
    same_size = pretrain_transform(META, 12, scale=(1, 1), ratio=(1, 1), normalize=False)
    out = same_size(x, torch.Generator().manual_seed(1))
    flipped = torch.isclose(out, torch.flip(x.float() / 255, dims=[-1]), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(out, x.float() / 255, atol=1e-5).flatten(1).all(1)
    assert (flipped | kept).all() and flipped.any()  # each image flipped or untouched


def test_random_crops_vary_and_are_reproducible(toy):
    aug = pretrain_transform(META, 12)
    x = toy.images[:8]
    a = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert aug.scale == (0.6, 1.0)  # small grayscale: the light crop
    assert pretrain_transform(META.with_(channels=3, image_size=(32, 32)), 32).scale == (0.2, 1.0)
    assert pretrain_transform(META.with_(hflip=False), 12).hflip is False


def test_eval_transform_resize_crop_normalise_and_channels(toy):
    x = toy.images[:3]
    ev = eval_transform(META, 12)
    assert torch.allclose(ev(x), (x.float() / 255 - 0.5) / 0.25)  # same size: normalise only
    big = eval_transform(META, 24, channels=3)(x)
    assert big.shape == (3, 3, 24, 24) and torch.equal(big[:, 0], big[:, 2])
    # 12 px images at 7 px: crop_pct 0.875, so shorter side round(7 / 0.875) = 8, then centre 7
    small = eval_transform(META, 7, normalize=False)(x)
    ref = F.interpolate(x.float() / 255, size=8, mode="bilinear", antialias=True)[..., :7, :7]
    assert torch.allclose(small, ref, atol=1e-6)


def test_image_transforms_refuse_vector_data():
    reg = build_dataset("synthetic_regression", n=8)
    with pytest.raises(ConfigError, match="holds no images"):
        pretrain_transform(reg.meta, 28)
