"""Atomic, checksummed checkpoints with fallback to the previous one.

A checkpoint is ``checkpoints/step_NNNNNNNN.pt`` written as: temporary file, flush, fsync,
rename, directory fsync; its SHA-256 is stored inside a small ``.sha256`` sidecar written the
same way *after* the checkpoint, so a checkpoint without a matching sidecar is incomplete.
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


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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
                state = torch.load(path, map_location="cpu", weights_only=False)
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
