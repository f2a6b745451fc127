"""Atomic, checksummed checkpoints with fallback to the previous one.

A checkpoint is ``checkpoints/step_NNNNNNNN.pt`` written as: temporary file, flush, fsync,
rename, directory fsync; its SHA-256 is stored inside a small ``.sha256`` sidecar written the
same way *after* the checkpoint, so a checkpoint without a matching sidecar is incomplete.

Checkpoints hold tensors, plain containers and numbers only (random states included), and are
read with ``torch.load(weights_only=True)``: a run directory from someone else cannot run code
on ``--resume``, ``eval``, ``masks`` or ``export``. A checkpoint that needs anything else is
refused with a message. Checkpoints written before this format (numpy's random state as an
array) still load: numpy arrays are the one extra type allowed.

Multi-process runs: every process's torch, numpy and Python random states (and CUDA's, where
used) are gathered to rank 0 and written into the one checkpoint, ``rng_ranks[r]`` for rank
``r``, with ``world_size``; ``rng`` is rank 0's, as in single-process checkpoints. One file keeps
the checkpoint atomic and checksummed as a whole: there is no step at which some ranks' states
are on disk and others' are not. Everything else in a checkpoint is the same on every rank
(parameters, optimizer states and data positions: gradients are averaged and every rank's
loader counts the same batches), so it is taken from rank 0; so are buffers that follow the
local batch (BatchNorm running statistics), which only evaluation reads, and evaluation runs on
rank 0. A resume with another number of
processes is refused unless asked to reshard (``rank_rng`` then has nothing for the new ranks).
Checkpoints written before per-rank states have ``rng`` only and no ``world_size``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MlomaeError
from .tracking import warn

PATTERN = re.compile(r"step_(\d+)\.pt")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(point: str) -> None:
    """Fault injection for the kill-and-resume tests: MLOMAE_FAULT=<point> kills the process
    there, as a power cut would."""
    if os.environ.get("MLOMAE_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        if fault:
            f.write(data[:len(data) // 2])
            f.flush()
            _fault(f"{fault}:tmp")
        f.write(data[len(data) // 2:] if fault else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _numpy_state() -> dict[str, Any]:
    """numpy's global random state as tensors and plain numbers (what ``weights_only`` loads)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(s: Any) -> None:
    if isinstance(s, dict):
        s = (s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
             s["cached_gaussian"])
    np.random.set_state(s)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def world_size_of(state: dict[str, Any]) -> int | None:
    """How many processes wrote ``state``; None for a checkpoint from before per-rank random
    states were saved (it holds rank 0's only)."""
    w = state.get("world_size")
    return None if w is None else int(w)


def rank_rng(state: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """Process ``rank``'s random states in checkpoint ``state``; None where it holds none for
    that rank (a rank beyond the processes that wrote it, or any rank but 0 in an older one)."""
    ranks = state.get("rng_ranks")
    if ranks is None:
        return state["rng"] if rank == 0 else None
    return ranks[rank] if rank < len(ranks) else None


def save(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = d / f"step_{step:08d}.pt"
    _atomic_bytes(path, data, fault=f"kill-in-checkpoint:{step}")
    _fault(f"kill-in-checkpoint:{step}:sidecar")
    _atomic_bytes(path.with_suffix(".pt.sha256"), hashlib.sha256(data).hexdigest().encode())
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".pt.sha256").unlink(missing_ok=True)
    return path


class UnsafeCheckpoint(MlomaeError):
    """A checkpoint that would need code to load: refused."""


def _legacy_globals() -> list:
    """numpy arrays, which checkpoints of the earlier format hold (numpy's random state)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load(path: str | os.PathLike) -> dict[str, Any]:
    """One checkpoint, with ``weights_only=True``; ``UnsafeCheckpoint`` if it needs code."""
    import pickle
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise UnsafeCheckpoint(
            f"checkpoint {path} is refused: loading it would run code ({what}). mlomae writes "
            f"only tensors, containers and numbers; a file that needs more was written by "
            f"something else. Resume only runs whose checkpoints mlomae wrote.") from None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def verify(path: Path) -> str | None:
    """None if intact, else what is wrong."""
    side = path.with_suffix(".pt.sha256")
    if not side.exists():
        return "no checksum file (the write did not complete)"
    want = side.read_text().strip()
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    return None if want == got else "checksum mismatch (truncated or corrupt)"


def load_latest(directory: str | os.PathLike, report: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint; a broken newer one is reported (unless ``report`` is
    false: the processes of a multi-process run other than rank 0) and skipped."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            try:
                state = load(path)
            except UnsafeCheckpoint:
                raise
            except Exception as e:  # unreadable despite the checksum: treat as corrupt
                bad.append((path, f"unreadable: {e}"))
                continue
            for b, why in bad if report else ():
                warn(f"checkpoint {b} is unusable ({why}); resuming from {path} instead")
            return path, state
        bad.append((path, problem))
    for b, why in bad if report else ():
        warn(f"checkpoint {b} is unusable ({why})")
    return None
