"""Helpers over a module's parameters: naming, swapping in other tensors, copying."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

from torch import Tensor, nn


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


@contextmanager
def swap_params(module: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, ``module`` computes with ``tensors`` in place of its parameters.

    Any tensor may stand in (graph tensors of an unrolled optimizer, snapshots); the real
    parameters are put back on exit, whatever happened inside.
    """
    saved = []
    try:
        for name, t in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = t  # bypasses nn.Module.__setattr__'s Parameter check
        yield
    finally:
        for owner, leaf, original in reversed(saved):
            owner._parameters[leaf] = original
