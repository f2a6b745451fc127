"""Errors a user can act on.

Every error raised for bad input derives from ``MlomaeError``; the CLI prints its message
(no traceback unless ``--debug``) and exits with code 2.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


def did_you_mean(name: Any, options: Iterable[Any]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(name), sorted(str(o) for o in options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class MlomaeError(Exception):
    """Base class of errors caused by the user's input (config, data, run directory)."""


class ConfigError(MlomaeError):
    """A bad value in an experiment file: names the file, the key path and the value."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 value: Any = ..., hint: str | None = None):
        self.file, self.key, self.value, self.hint = file, key, value, hint
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.key:
            where.append(f"key '{self.key}'")
        head = ": ".join([", ".join(where), self.detail]) if where else self.detail
        if self.value is not ...:
            head += f" (got {self.value!r})"
        if self.hint:
            head += f"; {self.hint}"
        return head

    def located(self, file: str | None = None, key: str | None = None) -> "ConfigError":
        """The same error with a file (and a key prefix) filled in where missing."""
        return ConfigError(self.detail, file=self.file or file,
                           key=self.key if self.key else key, value=self.value, hint=self.hint)


class DataError(MlomaeError):
    """Data missing or malformed: says where it looked and what to run or set."""


class GraphError(MlomaeError):
    """A problem graph that cannot run: cycles, unknown problems, unreachable problems."""


class NonFiniteError(MlomaeError):
    """A NaN or Inf in a loss, gradient or hypergradient."""
