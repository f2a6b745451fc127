"""Load a script of benchmarks/study/ as a module (they are not a package) for its tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study"


def load_study_script(name: str) -> ModuleType:
    """benchmarks/study/NAME.py, executed as a fresh module called NAME."""
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
