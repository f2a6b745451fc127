"""The non-finite guard: a NaN loss, gradient or hypergradient stops the run naming the
problem, the step and the quantity (keeping the last good checkpoint), or is skipped and
counted with trainer.on_nonfinite: skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilevel import Vector
from mlomae.cli import main
from mlomae.engine import Dependency, Engine, Problem
from mlomae.errors import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")

NAN_PROBLEM = '''
import torch
from problems.toy import PenalizedRegression

class NanAt(PenalizedRegression):
    """Poisons its loss at one of its own steps."""
    def __init__(self, *args, nan_at=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at = nan_at
    def loss(self, batch):
        loss, logs = super().loss(batch)
        if self.step_count + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss, logs
'''


def toy_with_nan(tmp_path, nan_at, *extra):
    (tmp_path / "nan_problem.py").write_text(NAN_PROBLEM)
    rd = tmp_path / "run"
    return rd, ["run", TOY, "--run-dir", str(rd), "--no-tracking", "trainer.steps=20",
                "trainer.checkpoint_every=4", f"problems.regression.target={tmp_path}/nan_problem.py:NanAt",
                f"+problems.regression.nan_at={nan_at}", *extra]


def test_nan_loss_stops_the_run_naming_problem_step_quantity(tmp_path, capsys):
    # regression takes 5 steps per outer step: its step 23 is in outer step 5
    rd, argv = toy_with_nan(tmp_path, 23)
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "non-finite loss in problem 'regression' at its step 23 (outer step 5)" in err
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "FAILED" and s["outer_steps"] == 4
    assert [p.name for p in sorted((rd / "checkpoints").glob("*.pt"))] == ["step_00000004.pt"]


def test_skip_mode_counts_and_continues(tmp_path, capsys):
    rd, argv = toy_with_nan(tmp_path, 23, "trainer.on_nonfinite=skip", "trainer.log_every=5")
    assert main(argv) == 0
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["skipped_steps"] == {"regression": 1, "hyper": 0}
    assert s["problem_steps"] == {"regression": 100, "hyper": 20}
    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["regression/skipped"] == 1.0 and "regression/skipped" not in lines[1]


class Quad(Problem):
    def loss(self, batch):
        return (self.module() ** 2).sum() * self.read("up")().sum()


class Up(Problem):
    def loss(self, batch):
        v = self.read("low")()
        # finite loss, but its gradient is infinite where v == 0 (d|v|^0.5/dv)
        return v.abs().sqrt().sum() + 0 * self.module().sum()


def test_nonfinite_hypergradient_is_named():
    low = Quad("low", Vector(2, 0.0), optimizer=None, reads=["up"])
    up = Up("up", Vector(2, 1.0), reads=["low"])
    low.optimizer = torch.optim.SGD(low.module.parameters(), lr=0.1)
    up.optimizer = torch.optim.SGD(up.module.parameters(), lr=0.1)
    eng = Engine([low, up], [Dependency("up", "low")], method="cg")
    with pytest.raises(NonFiniteError, match="non-finite hypergradient in problem 'up' at its step 1"):
        eng.step()
    # in skip mode the parameters are untouched and the skip is counted
    low2 = Quad("low", Vector(2, 0.0), reads=["up"])
    up2 = Up("up", Vector(2, 1.0), reads=["low"])
    low2.optimizer = torch.optim.SGD(low2.module.parameters(), lr=0.1)
    up2.optimizer = torch.optim.SGD(up2.module.parameters(), lr=0.1)
    eng2 = Engine([low2, up2], [Dependency("up", "low")], method="cg", on_nonfinite="skip")
    eng2.step()
    assert up2.skipped == 1 and torch.equal(up2.module.value.detach(), torch.ones(2, dtype=torch.float64))
