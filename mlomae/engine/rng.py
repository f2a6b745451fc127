"""Capture and replay torch's random state, so a loss re-evaluated for a hypergradient draws
the same masks, noise and dropout as the step that produced it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

RngState = tuple[torch.Tensor, list[torch.Tensor]]


def capture(devices: list[int]) -> RngState:
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), cuda


@contextmanager
def replay(state: RngState | None, devices: list[int]) -> Iterator[None]:
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state[0])
        for d, s in zip(devices, state[1]):
            torch.cuda.set_rng_state(s, d)
        yield
