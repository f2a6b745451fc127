"""A progress line for work that takes more than a few seconds: a bar redrawn in place on a
terminal, a plain line every ``every`` seconds otherwise (logs, CI), both with the rate and an
estimate of the time left. Written to stderr, so results on stdout stay clean."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``42 s``, ``3m07``, ``1h05``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}"
    return f"{s // 3600}h{(s % 3600) // 60:02d}"


class ProgressLine:
    """``with ProgressLine("evaluation[0] linear: fit", total=500, unit="iter") as bar:
    bar.update()``; ``total`` may be a cap (an early stop ends the line at ``close``)."""

    def __init__(self, label: str, total: int, unit: str = "it", stream: TextIO | None = None,
                 every: float = 10.0, min_seconds: float = 2.0):
        self.label, self.total, self.unit = label, max(1, int(total)), unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.min_seconds = every, min_seconds
        self.done = 0
        self.t0 = self.t_print = time.perf_counter()
        self.shown = False

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def text(self, now: float) -> str:
        elapsed = now - self.t0
        rate = self.done / max(elapsed, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = duration(left) if left != float("inf") else "?"
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, "
                f"{duration(elapsed)} elapsed, ~{eta} left)")

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        now = time.perf_counter()
        if now - self.t0 < self.min_seconds:   # short work prints nothing
            return
        if self.tty and now - self.t_print > 0.1:
            bar = "#" * int(20 * self.done / self.total)
            self.stream.write(f"\r[{bar:<20}] {self.text(now)}\033[K")
        elif not self.tty and (now - self.t_print >= self.every or not self.shown):
            self.stream.write(self.text(now) + "\n")
        else:
            return
        self.t_print, self.shown = now, True
        self.stream.flush()

    def close(self) -> None:
        """One closing line, only if the work ran long enough to show progress at all."""
        if self.shown:
            now = time.perf_counter()
            self.stream.write(("\r" if self.tty else "") + f"{self.label}: done, {self.done} "
                              f"{self.unit} in {duration(now - self.t0)}"
                              + ("\033[K" if self.tty else "") + "\n")
            self.stream.flush()
