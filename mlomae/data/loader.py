"""Batches in an order fixed by (seed, epoch), with a position that can be saved and restored.

Order: epoch e visits ``indices[perm_e]`` with ``perm_e = default_rng([seed, e]).permutation(n)``
(or ``indices`` as given when ``shuffle=False``). Steps cut that order into *global* batches of
``batch_size * world_size`` items; rank r takes the r-th run of ``batch_size`` items of each global
batch. So the ranks' batches of one step are disjoint and, concatenated in rank order, equal the
batch of a single-process loader with ``batch_size * world_size`` and the same seed.

The last, short global batch is dropped with ``drop_last`` (the default for training); otherwise
it is split as evenly as possible over the ranks (and dropped only if it has fewer items than
there are ranks, so that no rank gets an empty batch).

Augmentation draws from a generator seeded by (seed, epoch, step, rank), so ``state_dict()`` ->
``load_state_dict()`` replays the very same batches, augmentation included.

Fast path: datasets with ``gather(index_tensor)`` (the in-memory ones) are indexed once per
batch; others go through a torch DataLoader (``num_workers`` processes) that reads the items of
exactly the batches we hand it, in our order, and then the batch transform runs on the batch.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlomae.errors import ConfigError


class _Uint8Items(Dataset):
    """A folder dataset seen through ``get_uint8`` (a quarter of the float bytes between processes)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset.get_uint8(i)


def _accepts_generator(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or len(params) >= 2 or any(
        p.kind == p.VAR_POSITIONAL for p in params.values())


class InfiniteLoader:
    """Endless batches, epoch after epoch; ``iter_epoch()`` gives the rest of the current epoch.

    ``position`` counts the batches handed out in the current epoch; after an epoch's last batch
    the loader moves to (epoch + 1, position 0) at once.
    """

    def __init__(self, dataset: Any, indices: np.ndarray | None, batch_size: int, *,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 num_workers: int = 0, transform: Callable | None = None, rank: int = 0,
                 world_size: int = 1, device: str | torch.device | None = None, epoch: int = 0):
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
        if batch_size < 1:
            raise ConfigError("batch size must be at least 1", key="batch_size", value=batch_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must lie in 0..{world_size - 1}", key="rank", value=rank)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.transform = transform
        self._transform_takes_generator = transform is not None and _accepts_generator(transform)
        self.device = torch.device(device) if device is not None else None
        self.epoch, self.position = epoch, 0
        self._it: Iterator | None = None
        if len(self) == 0:
            raise ConfigError(f"{self.indices.size} items make no batch of {batch_size} x "
                              f"{world_size} rank(s) (drop_last={drop_last}); use a smaller batch",
                              key="batch_size", value=batch_size)

    # ---- order ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n, g = self.indices.size, self.batch_size * self.world_size
        full, rest = divmod(n, g)
        return full + (1 if not self.drop_last and rest >= self.world_size else 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every item of the epoch in visiting order (all ranks together)."""
        if not self.shuffle:
            return self.indices
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(self.indices.size)]

    def _rank_batches(self, epoch: int) -> list[np.ndarray]:
        order, b, w = self.epoch_order(epoch), self.batch_size, self.world_size
        g = b * w
        out = [order[s * g + self.rank * b: s * g + (self.rank + 1) * b]
               for s in range(order.size // g)]
        if len(out) < len(self):  # the short last global batch, shared evenly
            out.append(np.array_split(order[len(out) * g:], w)[self.rank])
        return out

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """The items of this rank's batch ``step`` of ``epoch``."""
        return self._rank_batches(epoch)[step]

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ConfigError(f"loader position {position} outside 0..{len(self)} (resumed with "
                              f"another batch size or split?)", key="position", value=position)
        self.close()
        self.epoch, self.position, self.seed = int(state["epoch"]), position, int(state["seed"])
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0

    # ---- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._raw_batches(self.epoch, self.position)
        x, y = next(self._it)
        batch = self._finish(x, y, self.epoch, self.position)
        self.position += 1
        if self.position == len(self):
            self.close()
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def iter_epoch(self):
        """The remaining batches of the current epoch (all of it when at position 0)."""
        for _ in range(len(self) - self.position):
            yield next(self)

    def close(self) -> None:
        """Stop the worker processes of the current epoch, if any (they also stop with the loader)."""
        it, self._it = self._it, None
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _raw_batches(self, epoch: int, start: int) -> Iterator:
        """Untransformed batches from ``start`` on; holds no reference to ``self``, so that a
        dropped loader is freed (and its workers stopped) at once."""
        batches = self._rank_batches(epoch)[start:]
        if hasattr(self.dataset, "gather"):
            gather = self.dataset.gather
            return (gather(torch.from_numpy(np.ascontiguousarray(b))) for b in batches)
        items = _Uint8Items(self.dataset) if hasattr(self.dataset, "get_uint8") else self.dataset
        return iter(DataLoader(items, batch_sampler=[b.tolist() for b in batches],
                               num_workers=self.num_workers))

    def _finish(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int):
        if self.device is not None:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.transform is None:
            if x.dtype == torch.uint8:
                x = x.float().div_(255.0)
            return x, y
        if self._transform_takes_generator:
            return self.transform(x, self.batch_generator(epoch, step)), y
        return self.transform(x), y

    def batch_generator(self, epoch: int, step: int) -> torch.Generator:
        """The CPU generator for the augmentation of this rank's batch ``step`` of ``epoch``."""
        state = np.random.SeedSequence([self.seed, epoch, step, self.rank]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def make_loader(dataset: Any, indices: np.ndarray | None, batch_size: int, shuffle: bool = True,
                seed: int = 0, drop_last: bool = True, num_workers: int = 0,
                transform: Callable | None = None, *, rank: int = 0, world_size: int = 1,
                device: str | torch.device | None = None) -> InfiniteLoader:
    """An ``InfiniteLoader`` over ``dataset[indices]`` (see the module doc for order and sharding).

    Without a transform, uint8 images come out as float in [0, 1]; a transform is called as
    ``transform(x, generator)`` on the whole batch (on ``device`` when given).
    """
    return InfiniteLoader(dataset, indices, batch_size, shuffle=shuffle, seed=seed,
                          drop_last=drop_last, num_workers=num_workers, transform=transform,
                          rank=rank, world_size=world_size, device=device)
