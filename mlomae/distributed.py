"""Multi-process runs under torchrun: process group set-up and gradient reduction.

``torchrun --nproc_per_node=N -m mlomae run EXP.yaml`` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(cfg) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        device = cfg["trainer"]["device"]
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
