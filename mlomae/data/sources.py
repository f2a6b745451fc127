"""The datasets by name: ``DATASETS`` and ``build_dataset``.

Every builder takes ``(root, split, download, **options)`` with ``split`` one of the two *base
splits*, ``train`` and ``test``, and returns a dataset of ``(float image [C, H, W], long label)``
with a ``.meta`` (``DatasetMeta``). Finer splits (``train[:80%]`` ...) are ``splits.py``'s job.

Where each one looks, in order, for every root of ``data_roots(root)`` (``root`` argument, then
$MLOMAE_DATA, then ~/.cache/mlomae):

- fashion_mnist: ``R/FashionMNIST/raw`` (torchvision's layout), ``R/fashion-mnist``, then Debian's
  ``/usr/share/datasets/fashion-mnist`` (package dataset-fashion-mnist); idx files, ``.gz`` or not.
- mnist: ``R/MNIST/raw``, ``R/mnist``, ``/usr/share/datasets/mnist``.
- cifar10 / cifar100: ``R/cifar-10-batches-py`` / ``R/cifar-100-python`` (torchvision's pickles).
- image_folder: ``R/train/<class>/...`` and ``R/val/<class>/...`` (or ``R/test``); test = val.
- imagenet: ``R`` or ``R/imagenet`` holding ``train/<wnid>/`` and ``val/<wnid>/``; test = val.
- npz: a ``.npz`` file (``path=`` or ``root`` itself), see ``_npz``.
- synthetic_regression / synthetic_classification: generated from a seed, nothing on disk.
- synthetic_imagenet: ImageNet's shape (1.28M / 50k images, 3 x 224 x 224, 1000 classes) or any
  other, generated per item from a seed when a batch is drawn; nothing on disk.

The generated sources (the last three) are built in ``synthetic.py``; every source registers
itself in ``registry.py``'s table.

``download=True`` calls torchvision's downloader into the first root (for the four torchvision
sets); nothing downloads unless asked.
"""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlomae.data.base import (IMAGENET_MEAN, IMAGENET_STD, DatasetMeta, TensorImageDataset,
                              data_roots, missing_data)
from mlomae.data.folder import (FolderImageDataset, class_folders, imagenet_synsets, loose_images)
from mlomae.data import synthetic  # noqa: F401  (registers the generated sources)
from mlomae.data.registry import DATASETS, DatasetEntry, register  # noqa: F401  (re-exported)
from mlomae.errors import ConfigError, DataError

BASE_SPLITS = ("train", "test")
DEBIAN_DIR = Path("/usr/share/datasets")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def build_dataset(name: str = "fashion_mnist", root: str | os.PathLike | None = None,
                  split: str = "train", download: bool = False, **kw: Any):
    """The base split ``split`` ('train' or 'test') of dataset ``name``; see the module doc."""
    if name not in DATASETS:
        raise ConfigError("unknown dataset", key="data.dataset", value=name,
                          hint="known: " + ", ".join(sorted(DATASETS)))
    if split not in BASE_SPLITS:
        raise ConfigError("a dataset's base split is 'train' or 'test' (an ImageNet val folder is "
                          "its 'test'); finer splits such as train[:80%] go in data.splits",
                          key="data.split", value=split)
    build = DATASETS[name].build
    try:
        inspect.signature(build).bind(root, split, download, **kw)
    except TypeError:
        allowed = [p for p in inspect.signature(build).parameters
                   if p not in ("root", "split", "download")]
        bad = sorted(set(kw) - set(allowed))
        raise ConfigError(f"dataset '{name}' takes no option {', '.join(bad)}",
                          key=f"data.{bad[0]}" if bad else "data", value=kw,
                          hint="its options: " + (", ".join(allowed) or "none")) from None
    return build(root, split, download, **kw)


# ---- idx files (MNIST, Fashion-MNIST) ------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx array (uint8 data only, as in (Fashion-)MNIST) from a plain or ``.gz`` file."""
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: idx header says {dims} but holds {len(raw) - offset} bytes "
                        f"(truncated download?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _idx_dataset(meta: DatasetMeta, tv_name: str, debian: str, root, split, download):
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    roots = data_roots(root)
    dirs = [d for r in roots for d in (r / tv_name / "raw", r / debian)] + [DEBIAN_DIR / debian]
    found = [_find_idx(dirs, s) for s in stems]
    if None in found and download:
        import torchvision  # only here: importing it costs a second
        try:
            getattr(torchvision.datasets, tv_name)(str(roots[0]), train=split == "train",
                                                   download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"downloading {tv_name} into {roots[0]} failed: {e}") from e
        found = [_find_idx(dirs, s) for s in stems]
    if None in found:
        missing = [f"{s}[.gz]" for s, f in zip(stems, found) if f is None]
        raise missing_data(f"{meta.name} {split} split (files {', '.join(missing)})", dirs)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{found[0]} has {images.shape[0]} images but {found[1]} has "
                        f"{labels.shape[0]} labels")
    return TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1),  # [N, 1, 28, 28]
                              torch.from_numpy(labels.astype(np.int64)), meta)


FASHION_META = DatasetMeta("fashion_mnist", 10, 1, (28, 28), (0.2860,), (0.3530,), hflip=True,
                           classes=FASHION_CLASSES)
MNIST_META = DatasetMeta("mnist", 10, 1, (28, 28), (0.1307,), (0.3081,), hflip=False,
                         classes=tuple(str(i) for i in range(10)))


@register("fashion_mnist", FASHION_META)
def _fashion_mnist(root, split, download):
    """Fashion-MNIST: 60k/10k 28x28 grayscale clothes, 10 classes (Debian or torchvision files)."""
    return _idx_dataset(FASHION_META, "FashionMNIST", "fashion-mnist", root, split, download)


@register("mnist", MNIST_META)
def _mnist(root, split, download):
    """MNIST: 60k/10k 28x28 grayscale digits, 10 classes (no flips: digits are not symmetric)."""
    return _idx_dataset(MNIST_META, "MNIST", "mnist", root, split, download)


# ---- CIFAR (torchvision's python pickles) --------------------------------------------------

CIFAR10_META = DatasetMeta("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616))
CIFAR100_META = DatasetMeta("cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path}: not a CIFAR python batch ({e})") from e


def _cifar(meta: DatasetMeta, folder: str, files: dict[str, list[str]], label_key: str,
           meta_file: str, names_key: str, tv_name: str, root, split, download):
    roots = data_roots(root)
    dirs = [r / folder for r in roots]
    wanted = files[split]
    found = next((d for d in dirs if all((d / f).is_file() for f in wanted)), None)
    if found is None and download:
        import torchvision
        try:
            getattr(torchvision.datasets, tv_name)(str(roots[0]), train=split == "train",
                                                   download=True)
        except Exception as e:
            raise DataError(f"downloading {tv_name} into {roots[0]} failed: {e}") from e
        found = next((d for d in dirs if all((d / f).is_file() for f in wanted)), None)
    if found is None:
        raise missing_data(f"{meta.name} {split} split (files {', '.join(wanted)})", dirs)
    xs, ys = [], []
    for f in wanted:
        batch = _unpickle(found / f)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{found / f}: CIFAR batch without 'data' and '{label_key}'")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    if (found / meta_file).is_file():
        meta = meta.with_(classes=tuple(_unpickle(found / meta_file).get(names_key, ())) or None)
    return TensorImageDataset(torch.from_numpy(np.concatenate(xs)),
                              torch.from_numpy(np.concatenate(ys)), meta)


@register("cifar10", CIFAR10_META)
def _cifar10(root, split, download):
    """CIFAR-10: 50k/10k 32x32 colour images, 10 classes (torchvision's cifar-10-batches-py)."""
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar(CIFAR10_META, "cifar-10-batches-py", files, "labels", "batches.meta",
                  "label_names", "CIFAR10", root, split, download)


@register("cifar100", CIFAR100_META)
def _cifar100(root, split, download):
    """CIFAR-100: 50k/10k 32x32 colour images, 100 fine classes (torchvision's cifar-100-python)."""
    return _cifar(CIFAR100_META, "cifar-100-python", {"train": ["train"], "test": ["test"]},
                  "fine_labels", "meta", "fine_label_names", "CIFAR100", root, split, download)


# ---- class folders ----------------------------------------------------------------------------

def _split_dirs(base: Path, split: str) -> list[Path]:
    return [base / "train"] if split == "train" else [base / "val", base / "test"]


def _find_folder_root(candidates: list[Path], what: str, split: str) -> tuple[Path, Path]:
    looked = []
    for base in candidates:
        if not (base / "train").is_dir():
            looked.append(base / "train")
            continue
        for d in _split_dirs(base, split):
            if d.is_dir():
                return base, d
            looked.append(d)
    raise missing_data(f"{what} ({split} folder)", looked, download_hint=False)


@register("image_folder")
def _image_folder(root, split, download, load_size: int | None = None,
                  mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                  hflip: bool = True):
    """Any images in root/train/<class>/ and root/val/<class>/ (test = val), ImageNet statistics.

    Classes are the sorted train folder names. ``load_size`` None keeps the first image's size.
    """
    if root is None and not os.environ.get("MLOMAE_DATA"):
        raise ConfigError("image_folder needs the folder that holds train/ and val/",
                          key="data.root", value=None)
    base, split_dir = _find_folder_root(data_roots(root)[:1], "image folder dataset", split)
    classes = class_folders(base / "train")
    if not classes:
        raise DataError(f"{base / 'train'}: no class folders (expected train/<class>/image files)")
    meta = DatasetMeta("image_folder", len(classes), 3, None, tuple(mean), tuple(std),
                       hflip=hflip, classes=tuple(classes))
    return FolderImageDataset(split_dir, {c: i for i, c in enumerate(classes)}, load_size, meta)


@register("imagenet", DatasetMeta("imagenet", 1000, 3, (256, 256), IMAGENET_MEAN, IMAGENET_STD))
def _imagenet(root, split, download, load_size: int = 256):
    """ImageNet-1K in the standard layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG (test = val).

    Labels are the standard indices 0..999 (position of the wnid in the sorted list of the 1000),
    also when only some classes are present.
    """
    candidates = [d for r in data_roots(root) for d in (r, r / "imagenet")]
    base, split_dir = _find_folder_root(candidates, "ImageNet (train/<wnid>/, val/<wnid>/)", split)
    if loose_images(split_dir):
        raise DataError(f"{split_dir}: images lie directly in the folder; the standard layout sorts "
                        f"them into one folder per class (val/<wnid>/...), e.g. with the usual "
                        f"valprep.sh script, or use dataset 'image_folder'")
    synsets = imagenet_synsets()
    present = class_folders(base / "train")
    if synsets is None:
        if len(present) != 1000:
            raise DataError(f"{base / 'train'}: {len(present)} class folders; without timm's list "
                            f"of ImageNet ids all 1000 must be present")
        synsets = present
    unknown = [c for c in present + class_folders(split_dir) if c not in set(synsets)]
    if unknown:
        raise DataError(f"{base}: folder '{unknown[0]}' is not an ImageNet-1K WordNet id "
                        f"(n01440764 ...); for other class folders use dataset 'image_folder'")
    meta = DATASETS["imagenet"].meta.with_(classes=tuple(synsets))
    return FolderImageDataset(split_dir, {c: i for i, c in enumerate(synsets)}, load_size, meta)


# ---- a user's arrays --------------------------------------------------------------------------

def _npz_key(arrays, split: str, kind: str) -> str | None:
    names = {"x": [f"x_{split}", f"X_{split}", f"{split}_x", f"{split}_images"],
             "y": [f"y_{split}", f"Y_{split}", f"{split}_y", f"{split}_labels"]}[kind]
    return next((n for n in names if n in arrays), None)


@register("npz")
def _npz(root, split, download, path: str | None = None, num_classes: int | None = None,
         mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
         hflip: bool = True):
    """A user's arrays in one .npz: x_train, y_train, x_test, y_test.

    Also accepted: X_train / train_x / train_images and Y_train / train_y / train_labels (and the
    same for test). Images: uint8 in [0, 255] or float in [0, 1], shaped [N, H, W] (grayscale),
    [N, H, W, C] or [N, C, H, W] (C in 1, 3). Labels: integers 0..K-1. ``path`` is the file
    (else ``root`` if it is a file, else ``root/data.npz``). Normalisation defaults to the train
    arrays' per-channel mean/std; ``num_classes`` to max label + 1 over both splits.
    """
    roots = data_roots(root)
    cands = [Path(os.path.expanduser(path))] if path else (
        [roots[0]] if roots[0].suffix == ".npz" else [r / "data.npz" for r in roots])
    file = next((c for c in cands if c.is_file()), None)
    if file is None:
        raise missing_data("npz arrays", cands, download_hint=False)
    with np.load(file) as arrays:
        xk, yk = _npz_key(arrays, split, "x"), _npz_key(arrays, split, "y")
        if xk is None or yk is None:
            raise DataError(f"{file}: no arrays for split '{split}' (looked for x_{split}/y_{split} "
                            f"and the aliases in the npz docs); it holds {sorted(arrays.files)}")
        x, y = _as_nchw(arrays[xk], f"{file}:{xk}"), np.asarray(arrays[yk]).astype(np.int64)
        ys = [np.asarray(arrays[key]) for s in BASE_SPLITS if (key := _npz_key(arrays, s, "y"))]
        xtrain = x if split == "train" or not _npz_key(arrays, "train", "x") else \
            _as_nchw(arrays[_npz_key(arrays, "train", "x")], f"{file}:train")
    if y.shape != (x.shape[0],):
        raise DataError(f"{file}: {xk} has {x.shape[0]} images but {yk} has shape {y.shape}")
    n_cls = num_classes or int(max(int(a.max()) for a in ys if a.size) + 1)
    scale = 255.0 if xtrain.dtype == np.uint8 else 1.0
    flat = xtrain.transpose(1, 0, 2, 3).reshape(xtrain.shape[1], -1).astype(np.float64) / scale
    meta = DatasetMeta("npz", n_cls, x.shape[1], (x.shape[2], x.shape[3]),
                       tuple(mean) if mean else tuple(round(float(v), 4) for v in flat.mean(1)),
                       tuple(std) if std else tuple(round(float(v), 4) for v in flat.std(1)),
                       hflip=hflip)
    images = torch.from_numpy(np.ascontiguousarray(x))
    return TensorImageDataset(images if x.dtype == np.uint8 else images.float(),
                              torch.from_numpy(y), meta)


def _as_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with C 1 or 3; "
                    f"got shape {x.shape}")
