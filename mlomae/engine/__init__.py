"""The multilevel optimization engine. Imports torch only (no images, YAML or tracking)."""

from .engine import Engine, StepRecord
from .hooks import Callback
from .graph import Dependency, Graph
from .problem import Problem

__all__ = ["Engine", "Problem", "Dependency", "Graph", "Callback", "StepRecord"]
