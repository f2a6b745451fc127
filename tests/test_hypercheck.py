"""``trainer.check_hypergrad_every`` and ``mlomae check-hypergrad RUN_DIR``: the configured
hypergradient against the exact unroll through the same lower steps, during training and at a
checkpoint, without moving the training."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch

from mlomae import checkpoint
from mlomae.build import build
from mlomae.callbacks import HypergradCheck
from mlomae.check import with_method
from mlomae.cli import main
from mlomae.config import load
from mlomae.errors import ConfigError
from mlomae.run import Runner

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "experiments" / "toy_bilevel.yaml")
HELPERS = Path(__file__).resolve().parent / "hypercheck_problems.py"
QUIET = ["tracking.enabled=false", "evaluation=[]", "trainer.log_every=1"]


def _run(rd: Path, *overrides: str) -> Runner:
    cfg = load(TOY, [*QUIET, *overrides])
    runner = Runner(cfg, run_dir=rd, tracking=False, stream=io.StringIO())
    runner.run()
    return runner


def _lines(rd: Path) -> list[dict]:
    return [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]


def _checks(rd: Path) -> dict[int, dict]:
    return {x["step"]: x for x in _lines(rd) if any(k.startswith("hypercheck/") for k in x)}


def _same(a, b) -> bool:
    """Nested states equal to the bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_cg_near_the_fixed_point_matches_the_unroll(tmp_path):
    """Full-batch SGD on the ridge lower level (lr 0.25: contraction <= 0.73 a step, so 30 steps
    from a point 30 steps in are at the fixed point to ~1e-4) and 30 CG iterations: the implicit
    hypergradient is the unroll's through those steps."""
    rd = tmp_path / "run"
    _run(rd, "trainer.steps=2", "trainer.check_hypergrad_every=2", "trainer.checkpoint_every=0",
         "problems.regression.optimizer={name: sgd, lr: 0.25}", "problems.regression.steps=30",
         "data.batch_size=200", "hypergrad.method=cg", "hypergrad.cg.iters=30")
    rec = _checks(rd)[2]
    assert rec["hypercheck/hyper/cosine"] >= 0.9999
    assert rec["hypercheck/hyper/norm_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert rec["hypercheck/hyper/rel_error"] < 1e-2
    assert rec["hypercheck/hyper/seconds"] > 0


def test_first_order_cosine_equals_the_hand_computed_one(tmp_path):
    """first_order's gradient is the direct one; the logged cosine is that of the direct
    gradient and the unroll's total, both computed here from the checkpoint of the checked step
    with the engine's own methods."""
    rd = tmp_path / "run"
    _run(rd, "trainer.steps=2", "trainer.check_hypergrad_every=2", "trainer.checkpoint_every=2",
         f"problems.hyper.target={HELPERS}:DirectValidation", "hypergrad.method=first_order")
    logged = _checks(rd)[2]
    state = checkpoint.load(rd / "checkpoints" / "step_00000002.pt")
    cfg = load(str(rd / "config.yaml"))
    totals = []
    for c in (cfg, with_method(cfg, "unroll")):
        eng = build(c).engine
        eng.load_state_dict(copy.deepcopy(state["engine"]))
        checkpoint.set_rng_state(state["rng"])
        eng.prefix("hyper")
        _, direct, hyper = eng.gradient("hyper")
        # the total in the parameters' precision, as a step applies it
        totals.append((torch.cat([d.reshape(-1) for d in direct]).double(),
                       torch.cat([h.reshape(-1) for h in hyper]).double(),
                       torch.cat([(d + h).reshape(-1) for d, h in zip(direct, hyper)]).double()))
    (direct_fo, hyper_fo, _), (_, _, ref) = totals
    assert float(hyper_fo.abs().max()) == 0.0 and float(direct_fo.norm()) > 0
    cosine = float(direct_fo @ ref) / (float(direct_fo.norm()) * float(ref.norm()))
    assert logged["hypercheck/hyper/cosine"] == pytest.approx(cosine, rel=1e-12)
    assert logged["hypercheck/hyper/norm_ratio"] == pytest.approx(
        float(direct_fo.norm()) / float(ref.norm()), rel=1e-12)
    assert logged["hypercheck/hyper/rel_error"] == pytest.approx(
        float((direct_fo - ref).norm()) / float(ref.norm()), rel=1e-12)
    assert cosine < 0.999   # the dropped term matters here: the check is not trivially 1


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory):
    """The same noisy experiment for 6 outer steps with checks every 2 (cg configured, darts
    beside it) and without; checkpoints at every second step."""
    base = tmp_path_factory.mktemp("hypercheck")
    common = ["trainer.steps=6", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=0",
              f"problems.regression.target={HELPERS}:NoisyRegression", "problems.regression.steps=3"]
    checked = _run(base / "checked", *common, "trainer.check_hypergrad_every=2",
                   "trainer.check_hypergrad_methods=[darts]")
    plain = _run(base / "plain", *common)
    return checked, plain


def test_checks_leave_the_trajectory_bit_identical(noisy_runs):
    checked, plain = noisy_runs
    assert any(isinstance(cb, HypergradCheck) for cb in checked.engine.callbacks)
    assert not any(isinstance(cb, HypergradCheck) for cb in plain.engine.callbacks)
    a, b = checked.run_dir.path, plain.run_dir.path
    assert sorted(_checks(a)) == [2, 4, 6] and not _checks(b)
    for step in (2, 4, 6):   # parameters, optimizer states, loader positions, random states
        name = f"step_{step:08d}.pt"
        sa, sb = checkpoint.load(a / "checkpoints" / name), checkpoint.load(b / "checkpoints" / name)
        assert _same(sa["engine"], sb["engine"]), step
        assert _same(sa["rng"], sb["rng"]), step
    assert _same(checked.engine.state_dict(), plain.engine.state_dict())

    def training(rd):   # every training metric but wall-clock times
        return [{k: v for k, v in x.items() if k != "time" and not k.endswith("seconds")}
                for x in _lines(rd) if not any(k.startswith("hypercheck/") for k in x)]
    assert training(a) == training(b) and len(training(a)) == 6


def test_check_hypergrad_run_dir_gives_the_logged_numbers(noisy_runs, tmp_path, capsys):
    checked, _ = noisy_runs
    rd = checked.run_dir.path
    logged = _checks(rd)[4]
    out = tmp_path / "rows.json"
    assert main(["check-hypergrad", str(rd), "--step", "4", "--methods", "darts",
                 "--json", str(out)]) == 0
    assert "checkpoint of outer step 4" in capsys.readouterr().out
    rows = {("configured" if r["configured"] else r["method"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {"unroll", "configured", "darts"}
    assert rows["unroll"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    for key, prefix in (("configured", "hypercheck/hyper/"), ("darts", "hypercheck/hyper/darts/")):
        for k in ("cosine", "rel_error", "norm_ratio"):
            assert rows[key][k] == pytest.approx(logged[prefix + k], rel=1e-12, abs=1e-15), (key, k)
    # the latest checkpoint by default
    assert main(["check-hypergrad", str(rd), "--methods", "darts"]) == 0
    assert "checkpoint of outer step 6" in capsys.readouterr().out


def test_check_hypergrad_missing_step_lists_the_available_ones(noisy_runs, capsys):
    rd = noisy_runs[0].run_dir.path
    assert main(["check-hypergrad", str(rd), "--step", "5"]) == 2
    err = capsys.readouterr().err
    assert "--step" in err and "available: 2, 4, 6" in err and "Traceback" not in err
    assert main(["check-hypergrad", TOY, "--step", "5"]) == 2
    assert "run directory" in capsys.readouterr().err


def test_check_hypergrad_experiment_file_unchanged(capsys):
    assert main(["check-hypergrad", TOY, "--methods", "cg"]) == 0
    out = capsys.readouterr().out
    assert "unroll" in out and "cg" in out and "*" not in out


@pytest.mark.parametrize("override,key", [("trainer.check_hypergrad_every=-1", "trainer.check_hypergrad_every"),
                                          ("trainer.check_hypergrad_every=two", "trainer.check_hypergrad_every"),
                                          ("trainer.check_hypergrad_methods=[dart]", "trainer.check_hypergrad_methods[0]")])
def test_schema_rejects_bad_values(override, key):
    with pytest.raises(ConfigError) as e:
        load(TOY, [override])
    assert key in str(e.value)


def test_the_check_does_not_change_the_experiment_digest():
    """--resume compares config digests: a run may be resumed with the check switched on (it
    does not change the trajectory), not with another precision."""
    from mlomae.build import config_digest
    base = config_digest(load(TOY, []))
    assert config_digest(load(TOY, ["trainer.check_hypergrad_every=5",
                                    "trainer.check_hypergrad_methods=[cg]"])) == base
    assert config_digest(load(TOY, ["trainer.precision=bf16"])) != base
