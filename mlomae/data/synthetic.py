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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mlomae.data.base import DatasetMeta, to_float_image

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
