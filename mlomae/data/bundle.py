"""One call from a data section's plain values to datasets, split indices and loaders.

    data = load_data("fashion_mnist", {"pretrain": "train", "finetune": "train[:80%]",
                                       "mask": "train[80%:]", "test": "test"}, seed=0)
    loader = data.loader("finetune", 128, seed=0, transform=eval_transform(data.meta, 28))

Only the base splits some role reads are loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mlomae.data.base import DatasetMeta
from mlomae.data.loader import InfiniteLoader, make_loader
from mlomae.data.sources import BASE_SPLITS, build_dataset
from mlomae.data.splits import (DEFAULT_DISJOINT, DEFAULT_TEST_ROLES, parse_split, resolve_splits,
                                save_split_indices)
from mlomae.errors import ConfigError


@dataclass
class DataBundle:
    meta: DatasetMeta
    datasets: dict[str, Any]       # base split name -> dataset
    indices: dict[str, np.ndarray]  # role -> item numbers of its base split
    sources: dict[str, str]        # role -> base split name
    specs: dict[str, str]          # role -> the spec as written
    seed: int

    def dataset(self, role: str) -> Any:
        """The base dataset a role's indices refer to."""
        if role not in self.indices:
            raise ConfigError(f"no data split for role '{role}'; splits: {', '.join(self.indices)}",
                              key=f"data.splits.{role}")
        return self.datasets[self.sources[role]]

    def loader(self, role: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
               drop_last: bool = True, transform: Callable | None = None,
               **kw: Any) -> InfiniteLoader:
        return make_loader(self.dataset(role), self.indices[role], batch_size, shuffle=shuffle,
                           seed=seed, drop_last=drop_last, transform=transform, **kw)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the indices (splits.npz + splits.json) into a run directory."""
        return save_split_indices(directory, self.indices, specs=self.specs, seed=self.seed)


def load_data(dataset: str, splits: Mapping[str, Any], seed: int, *,
              root: str | os.PathLike | None = None, download: bool = False,
              disjoint: Sequence[str] = DEFAULT_DISJOINT,
              test_roles: Sequence[str] = DEFAULT_TEST_ROLES, **options: Any) -> DataBundle:
    """Build the base splits that ``splits`` (role -> spec) read, and resolve every role."""
    specs = {role: parse_split(s, key=f"data.splits.{role}") for role, s in splits.items()}
    datasets = {}
    for src in dict.fromkeys(s.source for s in specs.values()):
        if src in BASE_SPLITS:  # resolve_splits names the role of any other
            datasets[src] = build_dataset(dataset, root, src, download, **options)
    indices = resolve_splits(specs, datasets, seed, disjoint=disjoint, test_roles=test_roles)
    meta = next(iter(datasets.values())).meta
    return DataBundle(meta, datasets, indices, {r: s.source for r, s in specs.items()},
                      {r: str(s) for r, s in specs.items()}, seed)
