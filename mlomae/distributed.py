"""Multi-process runs under torchrun: process group set-up and gradient averaging.

``torchrun --nproc_per_node=N -m mlomae run EXP.yaml`` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them everything here is a no-op. Every problem's data is sharded (each process takes
its block of each global batch), and every gradient the engine takes of a loss — direct
gradients, the adjoints entering lower problems, Hessian-vector products and mixed products
inside the hypergradient methods, the gradients of unrolled steps (differentiably) — is
averaged over the processes. So N processes with batch b follow the same trajectory as one
process with batch N·b, for every hypergradient method. Only rank 0 writes the run directory,
checkpoints and tracking.

Checkpoints of a multi-process run: each process draws its own masks and noise, so each has
its own random states. ``gather_to_main`` collects them to rank 0, which writes them all into
the one checkpoint (``mlomae.checkpoint``); on ``--resume`` every rank restores its own, and a
resume with another number of processes is refused unless ``--reshard`` is given. A stop asked
by a signal is agreed on by all processes (``max_over_ranks`` at the end of each outer step),
so that they all take part in the checkpoint and stop after the same step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from .engine.hooks import Reducer


def setup(cfg) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        device = cfg["trainer"]["device"]
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            if device in ("cuda", "auto"):
                cfg.data["trainer"]["device"] = f"cuda:{local}"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AllReduceMean(Reducer):
    """One all-reduce per call over all tensors flattened together."""

    def __init__(self, world: int):
        self.world = world

    def mean(self, tensors: list[Tensor | None]) -> list[Tensor | None]:
        present = [t for t in tensors if t is not None]
        if not present:
            return tensors
        flat = torch.cat([t.detach().reshape(-1) for t in present]).div_(self.world)
        dist.all_reduce(flat)
        out, i = [], 0
        for t in tensors:
            if t is None:
                out.append(None)
                continue
            out.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        return out

    def mean_differentiable(self, tensors: list[Tensor]) -> list[Tensor]:
        from torch.distributed.nn.functional import all_reduce
        flat = all_reduce(torch.cat([t.reshape(-1) for t in tensors]) / self.world)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        return out

    def all(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)


def gather_to_main(obj, rank: int, world: int) -> list | None:
    """Every process's ``obj`` (picklable, small), in rank order, on rank 0; None on the others.
    A collective: every rank must call it at the same point."""
    if world <= 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def max_over_ranks(value: int, world: int) -> int:
    """The largest of every process's ``value`` (a collective, as ``gather_to_main``)."""
    if world <= 1:
        return value
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def reducer(world: int) -> Reducer | None:
    return AllReduceMean(world) if world > 1 else None
