"""Synthetic images of any size, made on demand: ImageNet's shape with nothing on disk.

Item ``i`` of a base split is a function of ``(seed, split, i)`` alone: its label is entry ``i``
of a seeded, balanced label permutation (label = position mod K, shuffled), and its pixels are
the label's prototype (a smooth random 8x8 pattern per class and channel, bilinearly upsampled,
shared by train and test) plus Gaussian pixel noise drawn from a generator seeded by
``[seed, split, i]``. Nothing is held in memory but the labels and the 8x8 prototypes, so a
dataset of 1.28M images at 224 px costs 10 MB; a batch is generated when it is gathered
(a few milliseconds per 224 px image on one core), the same whichever batch, rank or epoch asks for it.

Meant for scale checks, benchmarks and tests of the ImageNet pipeline where the real data is
absent; the classes are learnable but nothing about natural images is.

The registered sources built here: ``synthetic_regression``, ``synthetic_classification`` and
``synthetic_imagenet`` (the last one on ``SyntheticImageDataset``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mlomae.data.base import DatasetMeta, TensorImageDataset, TensorPairDataset, to_float_image
from mlomae.data.registry import DATASETS, register
from mlomae.errors import ConfigError

PROTOTYPE_SIZE = 8
SPLIT_STREAM = {"train": 1, "test": 2}


class SyntheticImageDataset(Dataset):
    """``n`` images ``[channels, image_size, image_size]`` with labels 0..num_classes-1.

    ``gather(indices)`` returns the uint8 batch (the loaders' fast path); ``dataset[i]`` the
    float image in [0, 1] and its label, as every other image dataset.
    """

    def __init__(self, n: int, num_classes: int, channels: int, image_size: int, noise: float,
                 seed: int, split: str, meta: DatasetMeta):
        self.n, self.num_classes, self.channels = n, num_classes, channels
        self.image_size, self.noise, self.seed = image_size, noise, seed
        self.stream = SPLIT_STREAM[split]
        self.meta = meta
        labels = np.random.default_rng([seed, self.stream]).permutation(np.arange(n) % num_classes)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.prototypes = torch.from_numpy(np.random.default_rng([seed, 0]).random(
            (num_classes, channels, PROTOTYPE_SIZE, PROTOTYPE_SIZE), dtype=np.float32))

    def __len__(self) -> int:
        return self.n

    def _noise(self, i: int) -> np.ndarray:
        g = np.random.default_rng([self.seed, self.stream, i])
        return g.standard_normal((self.channels, self.image_size, self.image_size), dtype=np.float32)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images ``[B, C, S, S]`` and labels ``[B]`` of items ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"{self.meta.name}: items {idx.tolist()} outside 0..{self.n - 1}")
        labels = self.labels[idx]
        s = self.image_size
        x = F.interpolate(self.prototypes[labels], size=(s, s), mode="bilinear",
                          align_corners=False) if idx.numel() else \
            torch.zeros(0, self.channels, s, s)
        if self.noise and idx.numel():
            x = x + self.noise * torch.from_numpy(np.stack([self._noise(int(i)) for i in idx]))
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8), labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.gather(torch.tensor([int(i)]))
        return to_float_image(x[0]), y[0]

    def __repr__(self) -> str:
        return (f"SyntheticImageDataset({self.meta.name}, n={self.n}, "
                f"shape=({self.channels}, {self.image_size}, {self.image_size}), "
                f"classes={self.num_classes}, seed={self.seed})")


# ---- the generated sources, by name --------------------------------------------------------------

def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


@register("synthetic_regression",
          DatasetMeta("synthetic_regression", None, None, None, task="regression"))
def _synthetic_regression(root, split, download, n: int = 1000, dim: int = 10,
                          noise: float = 0.1, seed: int = 0):
    """Linear regression pairs (x, y): x ~ N(0, I_dim), y = x . w* + noise * N(0, 1).

    w* ~ N(0, I) depends on the seed only; train and test draw different x from the same w*.
    The dataset carries ``w_star`` for closed-form checks.
    """
    w = _rng(seed, 0).standard_normal(dim)
    g = _rng(seed, 1 if split == "train" else 2)
    x = g.standard_normal((n, dim))
    y = x @ w + noise * g.standard_normal(n)
    meta = DATASETS["synthetic_regression"].meta.with_(dim=dim)
    return TensorPairDataset(torch.tensor(x, dtype=torch.float32),
                             torch.tensor(y, dtype=torch.float32), meta,
                             w_star=torch.tensor(w, dtype=torch.float32))


@register("synthetic_classification")
def _synthetic_classification(root, split, download, n: int = 1024, num_classes: int = 10,
                              channels: int = 1, image_size: int = 28, noise: float = 0.25,
                              seed: int = 0):
    """Small images with nothing on disk: class prototypes (smooth random patterns) plus noise.

    Classes are balanced (label = i mod K, shuffled); prototypes depend on the seed only, so
    train and test share them. Learnable in a few hundred steps: for quick runs and tests.
    """
    coarse = _rng(seed, 0).random((num_classes, channels, 7, 7))
    protos = torch.nn.functional.interpolate(torch.tensor(coarse), size=image_size,
                                             mode="bilinear", align_corners=False).numpy()
    g = _rng(seed, 1 if split == "train" else 2)
    labels = g.permutation(np.arange(n) % num_classes)
    x = protos[labels] + noise * g.standard_normal((n, channels, image_size, image_size))
    images = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    meta = DatasetMeta("synthetic_classification", num_classes, channels,
                       (image_size, image_size), (0.5,) * channels, (0.3,) * channels)
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), meta)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"must be an integer {span}", key=f"data.options.{name}", value=value)
    return int(value)


@register("synthetic_imagenet")
def _synthetic_imagenet(root, split, download, n: int = 1_281_167, n_test: int = 50_000,
                        num_classes: int = 1000, channels: int = 3, image_size: int = 224,
                        noise: float = 0.25, seed: int = 0):
    """ImageNet-shaped images generated on demand (defaults: 1.28M train / 50k test, 3x224x224).

    ``n`` / ``n_test``: items of the train / test base split; splits, label fractions, sharding
    and every problem work on it as on any other source. Item i depends on (seed, split, i)
    only (see ``SyntheticImageDataset``); ``seed`` is this option, not the experiment's seed, so that
    changing the experiment's seed reshuffles the splits but keeps the images.
    """
    n = _check_int("n", n, 1)
    n_test = _check_int("n_test", n_test, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    channels = _check_int("channels", channels, 1, 3)
    if channels == 2:
        raise ConfigError("must be 1 (grayscale) or 3 (colour)", key="data.options.channels",
                          value=channels)
    image_size = _check_int("image_size", image_size, 1)
    seed = _check_int("seed", seed, 0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ConfigError("must be a number >= 0 (the pixel noise's standard deviation, in units "
                          "of the full range)", key="data.options.noise", value=noise)
    size = n if split == "train" else n_test
    meta = DatasetMeta("synthetic_imagenet", num_classes, channels, (image_size, image_size),
                       (0.5,) * channels, (0.3,) * channels,
                       classes=tuple(f"class_{k:04d}" for k in range(num_classes)))
    return SyntheticImageDataset(size, num_classes, channels, image_size, float(noise), seed,
                                 split, meta)
