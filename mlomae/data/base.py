"""What every dataset shares: its metadata, the in-memory tensor datasets, and where data lives.

Images are kept as uint8 ``[N, C, H, W]`` in one tensor; they become float only per batch (see
``transforms.py``), so a 60k-image dataset costs 47 MB and indexing a batch is one gather.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mlomae.errors import DataError

# Environment variable naming the data root; `data.root` in an experiment overrides it.
DATA_ENV = "MLOMAE_DATA"
DEFAULT_ROOT = "~/.cache/mlomae"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetMeta:
    """What a model, a transform or a head needs to know about a dataset without loading it.

    ``image_size`` is (H, W) of the stored images; ``hflip`` says whether a horizontal flip keeps
    an image in its class (true for clothes and natural photos, false for digits).
    ``task`` is "classification" (images, long labels) or "regression" (vectors, float targets).
    """

    name: str
    num_classes: int | None
    channels: int | None
    image_size: tuple[int, int] | None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    hflip: bool = True
    task: str = "classification"
    dim: int | None = None
    classes: tuple[str, ...] | None = field(default=None, compare=False)

    def with_(self, **changes: Any) -> "DatasetMeta":
        return replace(self, **changes)


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 ``[N, C, H, W]`` with long labels ``[N]``.

    ``dataset[i]`` gives ``(float image [C, H, W] in [0, 1], label)``; loaders use the fast path
    ``gather(indices)``, which returns the raw uint8 batch in one indexing operation.
    Float images in [0, 1] are accepted too (e.g. a user's float arrays).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, meta: DatasetMeta):
        if images.ndim != 4:
            raise DataError(f"{meta.name}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{meta.name}: {images.shape[0]} images but labels of shape "
                            f"{tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.long()
        self.meta = meta

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float_image(self.images[i]), self.labels[i]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``indices`` as stored (uint8 images), for loaders and batch transforms."""
        return self.images[indices], self.labels[indices]

    def __repr__(self) -> str:
        return (f"TensorImageDataset({self.meta.name}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, dtype={self.images.dtype})")


class TensorPairDataset(Dataset):
    """Float pairs ``(x [D], y)`` in memory: the image-free datasets (synthetic regression)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, meta: DatasetMeta, **extra: Any):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{meta.name}: {x.shape[0]} inputs but {y.shape[0]} targets")
        self.x, self.y, self.meta = x, y, meta
        for k, v in extra.items():  # e.g. w_star, the true weights of a synthetic regression
            setattr(self, k, v)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    @property
    def labels(self) -> torch.Tensor | None:
        # Integer targets count as class labels (synthetic classification as vectors).
        return self.y if not torch.is_floating_point(self.y) else None


def to_float_image(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is passed through as float32."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def dataset_labels(dataset: Any) -> np.ndarray | None:
    """Class labels of a dataset as an int64 array, without loading its images.

    Accepts a label array itself, or any dataset with ``labels`` / ``targets`` (our datasets and
    torchvision's); returns None when the dataset has no class labels.
    """
    if isinstance(dataset, (np.ndarray, torch.Tensor)):
        labels = dataset
    else:
        labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        if torch.is_floating_point(labels):
            return None
        return labels.cpu().numpy().astype(np.int64, copy=False)
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        return None
    return arr.astype(np.int64, copy=False)


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Where to look for data, in order: ``root`` (data.root), $MLOMAE_DATA, ~/.cache/mlomae.

    The first entry is also where a download goes.
    """
    found: list[Path] = []
    for r in (root, os.environ.get(DATA_ENV) or None, DEFAULT_ROOT):
        if r is None:
            continue
        p = Path(os.path.expanduser(str(r)))
        if p not in found:
            found.append(p)
    return found


def missing_data(what: str, looked: Sequence[str | os.PathLike], *,
                 download_hint: bool = True, extra: str = "") -> DataError:
    """The one error for absent data: every place looked at, and what to run or set."""
    places = "\n".join(f"  - {p}" for p in looked)
    fixes = ["run `make data` (scripts/get_data.sh)"] if download_hint else []
    fixes.append(f"set data.root (or the environment variable {DATA_ENV}) to the directory that "
                 f"holds it")
    if download_hint:
        fixes.append("pass download=True where the machine has internet")
    msg = f"{what} not found. Looked in:\n{places}\nTo fix: " + "; or ".join(fixes) + "."
    if extra:
        msg += " " + extra
    return DataError(msg)
