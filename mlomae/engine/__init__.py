"""The multilevel optimization engine. Imports torch only (no images, YAML or tracking)."""

from .engine import Engine, StepRecord
from .graph import Dependency, Graph
from .hooks import Callback
from .problem import Problem

__all__ = ["Engine", "Problem", "Dependency", "Graph", "Callback", "StepRecord"]
