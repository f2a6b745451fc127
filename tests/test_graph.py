"""The schedule against tables worked out by hand, and graph validation errors."""

from __future__ import annotations

import pytest
import torch

from bilevel import Vector
from mlomae.engine import Dependency, Engine, Graph, Problem
from mlomae.errors import GraphError
from mlomae.hypergrad.darts import Darts
from mlomae.hypergrad.neumann import Neumann

def graph(steps, deps, reads=None, method="darts"):
    return Graph(steps, reads or {}, [Dependency(*d) if isinstance(d, tuple) else d for d in deps],
                 default_method=method)


# Each table is one period: leaves tick in declaration order, an upper steps once every
# lower has taken its K steps since the upper last stepped.
TABLES = [
    ({"a": 1}, [], ["a"]),
    ({"low": 3, "up": 1}, [("up", "low")], ["low"] * 3 + ["up"]),
    # MLO-MAE with unroll steps 2/1/1
    ({"pretrain": 2, "finetune": 1, "mask": 1},
     [("mask", "pretrain"), ("finetune", "pretrain"), ("mask", "finetune")],
     ["pretrain", "pretrain", "finetune", "mask"]),
    # pretrain 2 per finetune step, finetune 3 per mask step: 6 / 3 / 1
    ({"pretrain": 2, "finetune": 3, "mask": 1},
     [("mask", "pretrain"), ("finetune", "pretrain"), ("mask", "finetune")],
     ["pretrain", "pretrain", "finetune"] * 3 + ["mask"]),
    # AutoMAE-like: two leaves under one generator, the discriminator twice per generator step
    ({"pretrain": 1, "disc": 2, "gen": 1}, [("gen", "pretrain"), ("gen", "disc")],
     ["pretrain", "disc", "pretrain", "disc", "gen"]),
]


@pytest.mark.parametrize("steps,deps,expected", TABLES)
def test_cycle_matches_hand_table(steps, deps, expected):
    assert graph(steps, deps).cycle() == expected


class Count(Problem):
    def loss(self, batch):
        return (self.module() ** 2).sum()


def test_engine_step_counts_after_outer_steps():
    """pretrain 2 / finetune 3 / mask 1: after 4 outer steps, 24 / 12 / 4 steps."""
    ps = [Count(n, Vector(2, 1.0), optimizer=None, data=None, steps=k)
          for n, k in (("pretrain", 2), ("finetune", 3), ("mask", 1))]
    for p in ps:
        p.optimizer = torch.optim.SGD(p.module.parameters(), lr=0.1)
    eng = Engine(ps, [Dependency("mask", "pretrain"), Dependency("finetune", "pretrain"),
                      Dependency("mask", "finetune")], method="first_order")
    eng.run(4)
    assert [p.step_count for p in ps] == [24, 12, 4]
    assert eng.outer_step == 4


@pytest.mark.parametrize("steps,deps,reads,needle", [
    ({"a": 1, "b": 1}, [("a", "c")], {}, "lower 'c' is not a declared problem"),
    ({"a": 1, "b": 1}, [("a", "a")], {}, "cannot depend on itself"),
    ({"a": 1, "b": 1, "c": 1}, [("a", "b"), ("b", "c"), ("c", "a")], {}, "cycle: a -> b -> c -> a"),
    ({"a": 1, "b": 1, "c": 1}, [("a", "b")], {}, "problem 'c' is in no dependency"),
    ({"a": 1, "b": 1}, [("a", "b"), ("a", "b")], {}, "declared twice"),
    ({"a": 1, "b": 1}, [("a", "b")], {"a": ["bb"]}, "reads unknown problem 'bb' (did you mean 'b'?)"),
    ({"a": 1, "b": 0}, [("a", "b")], {}, "steps must be a positive integer"),
    ({"a": 1, "b": 1}, [Dependency("a", "b", method="dart")], {}, "unknown hypergradient method 'dart' (did you mean 'darts'?)"),
])
def test_graph_errors_name_the_culprit(steps, deps, reads, needle):
    with pytest.raises(GraphError) as e:
        graph(steps, deps, reads)
    assert needle in str(e.value)


def test_unknown_default_method():
    with pytest.raises(GraphError, match="unknown hypergradient method 'cgg'"):
        graph({"a": 1}, [], method="cgg")


def test_per_dependency_method_override():
    g = graph({"pretrain": 2, "finetune": 1, "mask": 1},
              [Dependency("mask", "pretrain", method="neumann", options={"iters": 3}),
               ("finetune", "pretrain"), ("mask", "finetune")],
              reads={"pretrain": ["mask"], "finetune": ["pretrain"], "mask": ["finetune", "pretrain"]})
    plan = g.plans["mask"]
    assert plan.methods == {"pretrain": Neumann(iters=3), "finetune": Darts()}
    assert plan.order == ["finetune", "pretrain"]
    assert g.unrolled() == set()
