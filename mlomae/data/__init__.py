"""Datasets, splits, batch transforms and resumable loaders.

Nothing here reads YAML: every function takes plain arguments.

    data = load_data("fashion_mnist", {"pretrain": "train", "finetune": "train[:80%]",
                                       "mask": "train[80%:]", "test": "test"}, seed=0)
    loader = data.loader("pretrain", 256, seed=0, transform=pretrain_transform(data.meta, 28))

or piece by piece:

    ds = build_dataset("fashion_mnist", root=None, split="train")      # TensorImageDataset
    idx = resolve_splits({"pretrain": "train", "finetune": "train[:80%]", "mask": "train[80%:]"},
                         {"train": ds}, seed=0)
    loader = make_loader(ds, idx["finetune"], 128, shuffle=True, seed=0,
                         transform=eval_transform(ds.meta, 28))
    x, y = next(loader)                                                 # [128, 1, 28, 28], [128]
"""

from mlomae.data.base import (DATA_ENV, DatasetMeta, TensorImageDataset, TensorPairDataset,
                              data_roots, dataset_labels)
from mlomae.data.bundle import DataBundle, load_data
from mlomae.data.folder import FolderImageDataset
from mlomae.data.loader import InfiniteLoader, make_loader
from mlomae.data.sources import DATASETS, DatasetEntry, build_dataset, read_idx
from mlomae.data.synthetic import SyntheticImageDataset
from mlomae.data.splits import (SplitSpec, base_permutation, check_disjoint, load_split_indices,
                                parse_split, resolve_split, resolve_splits, save_split_indices)
from mlomae.data.transforms import BatchTransform, eval_transform, pretrain_transform

__all__ = [
    "DATA_ENV", "DATASETS", "BatchTransform", "DataBundle", "DatasetEntry", "DatasetMeta",
    "FolderImageDataset", "InfiniteLoader", "SplitSpec", "SyntheticImageDataset", "TensorImageDataset", "TensorPairDataset",
    "base_permutation", "build_dataset", "check_disjoint", "data_roots", "dataset_labels",
    "eval_transform", "load_data", "load_split_indices", "make_loader", "parse_split",
    "pretrain_transform", "read_idx", "resolve_split", "resolve_splits", "save_split_indices",
]
