"""Methods as objects: options checked on construction, the graph and engine asking the object,
a new method added as one registered class, and the walls that keep method names and YAML out
of the engine's clients."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mlomae.errors import GraphError
from mlomae.hypergrad import METHODS, Keep, Method, make
from mlomae.hypergrad.base import option, register
from mlomae.hypergrad.darts import Darts, finite_difference
from test_engine_hypergrad import ridge_engine

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_declares_its_options_and_needs():
    """The table of README's "Hypergradient methods", from the objects themselves."""
    got = {name: ({k: d for k, (d, _) in cls.options().items()}, make(name).keeps,
                  make(name).second_order, cls.passes) for name, cls in METHODS.items()}
    assert got == {
        "unroll": ({}, Keep.UNROLLED, True, True),
        "darts": ({"alpha": 0.01, "scale": 1.0, "exact": False}, Keep.NOTHING, False, True),
        "neumann": ({"iters": 5, "eta": None}, Keep.NOTHING, True, True),
        "cg": ({"iters": 5, "tol": 1e-10}, Keep.NOTHING, True, True),
        "first_order": ({}, Keep.NOTHING, False, False),
        "sama": ({"alpha": 1.0, "exact": False}, Keep.STEP_GRADIENT, False, True),
    }
    assert make("darts", {"exact": True}).keeps is Keep.STEP_GRAPH
    assert make("sama", {"exact": True}).keeps is Keep.STEP_GRAPH
    assert [n for n, c in METHODS.items() if make(n).applied_gradient] == ["sama"]
    assert [n for n, c in METHODS.items() if c.reference] == ["unroll"]


def test_the_python_api_rejects_unknown_and_out_of_range_options():
    with pytest.raises(GraphError, match=r"option 'alpah': not an option of 'darts' \(did you mean 'alpha'\?\)"):
        ridge_engine("darts", 1, options={"alpah": 0.1})
    with pytest.raises(GraphError, match="option 'iters': must be a positive integer"):
        ridge_engine("cg", 1, options={"iters": 0})
    with pytest.raises(GraphError, match="option 'exact': must be true or false"):
        ridge_engine("darts", 1, options={"exact": "yes"})
    with pytest.raises(TypeError):
        Darts(alpah=0.1)


def test_a_method_object_is_the_same_as_its_name_and_options():
    a, _ = ridge_engine(Darts(alpha=0.3), 2)
    b, _ = ridge_engine("darts", 2, options={"alpha": 0.3})
    assert a.graph.plans["hyper"].methods == b.graph.plans["hyper"].methods == {"lower": Darts(alpha=0.3)}
    for eng in (a, b):
        eng.prefix("hyper")
    assert torch.equal(a.gradient("hyper")[2][0], b.gradient("hyper")[2][0])


def test_a_new_method_is_one_registered_class():
    """README's example: half of DARTS's push, registered at run time, runs through the engine
    and equals DARTS's push / 2 exactly (a power of two: no rounding)."""
    @register
    @dataclass(frozen=True)
    class Halved(Method):
        name = "halved"
        summary = "half of DARTS's push"
        alpha: float = option(0.01, "finite-difference step", above=0.0)

        def __call__(self, v, lower, inputs):
            pushed = finite_difference([t.detach() for t in v], lower, inputs, self.alpha)
            return [None if g is None else g / 2 for g in pushed]

    try:
        assert make("halved", {"alpha": 0.02}) == Halved(alpha=0.02)
        engs = [ridge_engine(m, 2, options={"alpha": 0.02})[0] for m in ("halved", "darts")]
        for eng in engs:
            eng.prefix("hyper")
        half, full = (eng.gradient("hyper")[2][0] for eng in engs)
        assert full.norm() > 0 and torch.equal(half, full / 2)
    finally:
        del METHODS["halved"]


def _sources(*dirs: str):
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            yield path, path.read_text()


def test_no_method_name_is_compared_as_a_string_outside_hypergrad():
    names = "|".join(METHODS)
    compare = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names}|darts_exact)["']|["']({names}|darts_exact)["']\s*(==|!=)""")
    found = [f"{p.relative_to(ROOT)}:{i + 1}: {line.strip()}"
             for p, text in _sources("mlomae", "problems")
             if "hypergrad" not in p.parts
             for i, line in enumerate(text.splitlines()) if compare.search(line)]
    assert found == []


def test_problems_import_nothing_of_the_configuration_layer():
    banned = {"mlomae.components", "mlomae.config", "mlomae.schema", "mlomae.build"}
    found = []
    for p, text in _sources("problems"):
        for node in ast.walk(ast.parse(text)):
            mods = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{p.name}: {m}" for m in mods if m in banned]
    assert found == []
