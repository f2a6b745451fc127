"""Atomic, checksummed checkpoints with fallback to the previous one.

A checkpoint is ``checkpoints/step_NNNNNNNN.pt`` written as: temporary file, flush, fsync,
rename, directory fsync; its SHA-256 is stored inside a small ``.sha256`` sidecar written the
same way *after* the checkpoint, so a checkpoint without a matching sidecar is incomplete.

Checkpoints hold tensors, plain containers and numbers only (random states included), and are
read with ``torch.load(weights_only=True)``: a run directory from someone else cannot run code
on ``--resume``, ``eval``, ``masks`` or ``export``. A checkpoint that needs anything else is
refused with a message. Checkpoints written before this format (numpy's random state as an
array) still load: numpy arrays are the one extra type allowed.
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


def load_latest(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint; a broken newer one is reported and skipped."""
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
            for b, why in bad:
                warn(f"checkpoint {b} is unusable ({why}); resuming from {path} instead")
            return path, state
        bad.append((path, problem))
    for b, why in bad:
        warn(f"checkpoint {b} is unusable ({why})")
    return None
