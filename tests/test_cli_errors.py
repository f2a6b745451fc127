"""Bad input: a corpus of malformed experiments. Each must exit with code 2, print one message
naming the file, key or value, show no traceback, and leave no run directory behind."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlomae.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOY = yaml.safe_load((ROOT / "experiments" / "toy_bilevel.yaml").read_text())


def edit(fn):
    def apply(d):
        fn(d)
        return d
    return apply


def setp(path, value):
    def fn(d):
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return edit(fn)


def delp(path):
    def fn(d):
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[p]
        del node[parts[-1]]
    return edit(fn)


# (id, mutation of the toy experiment, extra CLI args, substrings the message must contain)
CASES = [
    ("unknown-top-key", setp("trainerr", {}), [], ["'trainerr'", "did you mean 'trainer'"]),
    ("unknown-trainer-key", setp("trainer.stpes", 3), [], ["trainer.stpes", "did you mean 'steps'"]),
    ("wrong-type", setp("trainer.steps", "ten"), [], ["trainer.steps", "must be an integer", "'ten'"]),
    ("zero-steps", setp("trainer.steps", 0), [], ["trainer.steps", "positive"]),
    ("negative-problem-steps", setp("problems.regression.steps", -1), [], ["problems.regression.steps", "-1"]),
    ("unknown-target-attr", setp("problems.hyper.target", "problems.toy.Nope"), [], ["problems.hyper.target", "has no 'Nope'"]),
    ("unknown-target-module", setp("problems.hyper.target", "nopkg.mod.Class"), [], ["problems.hyper.target", "nopkg.mod.Class"]),
    ("not-a-problem", setp("problems.hyper.target", "torch.nn.Linear"), [], ["problems.hyper.target", "not a subclass"]),
    ("user-file-missing", setp("problems.hyper.target", "missing_file.py:P"), [], ["problems.hyper.target", "file not found"]),
    ("cycle", setp("dependencies", [{"upper": "hyper", "lower": "regression"},
                                     {"upper": "regression", "lower": "hyper"}]), [], ["cycle"]),
    ("self-dependency", setp("dependencies", [{"upper": "hyper", "lower": "hyper"}]), [], ["dependencies[0]", "itself"]),
    ("missing-dependency-problem", setp("dependencies", [{"upper": "hyper", "lower": "regresion"}]), [],
     ["dependencies[0].lower", "did you mean 'regression'"]),
    ("unknown-method", setp("hypergrad", {"method": "neuman"}), [], ["hypergrad.method", "did you mean 'neumann'"]),
    ("unknown-method-option", setp("hypergrad", {"method": "cg", "iter": 5}), [], ["hypergrad.iter", "not an option of 'cg'"]),
    ("bad-method-option-value", setp("hypergrad", {"method": "cg", "iters": 0}), [], ["hypergrad.iters", "positive"]),
    ("unknown-dependency-method", setp("dependencies", [{"upper": "hyper", "lower": "regression",
                                                          "hypergrad": {"method": "dart"}}]), [],
     ["dependencies[0].hypergrad.method", "did you mean 'darts'"]),
    ("module-not-declared", setp("problems.hyper.module", "penalti"), [], ["problems.hyper.module", "did you mean 'penalty'"]),
    ("reads-unknown", setp("problems.hyper.reads", ["regresion"]), [], ["problems.hyper.reads", "'regresion'"]),
    ("data-unknown-split", setp("problems.hyper.data", "vall"), [], ["problems.hyper.data", "did you mean 'val'"]),
    ("train-on-test", setp("problems.hyper.data", "test"), [], ["problems.hyper.data", "test split"]),
    ("test-role-reads-test", setp("data.splits.val", "test[:50%]"), [], ["data.splits.val", "test"]),
    ("overlapping-splits", edit(lambda d: d["data"].update(disjoint=["train", "val"],
                                                           splits={"train": "train[:60%]", "val": "train[50%:]", "test": "test"})),
     [], ["'train'", "'val'", "share"]),
    ("empty-split", setp("data.splits.val", "train[50%:50%]"), [], ["data.splits.val", "empty"]),
    ("fraction-out-of-range", setp("data.splits.val", "train[:150%]"), [], ["data.splits.val", "150%"]),
    ("unknown-dataset", setp("data.dataset", "fashion_mnits"), [], ["data.dataset", "fashion_mnits"]),
    ("dataset-option", setp("data.options", {"n": 400, "dimm": 3}), [], ["dimm"]),
    ("model-kwarg-typo", setp("models.regression.in_feature", 20), [], ["models.regression.in_feature", "did you mean 'in_features'"]),
    ("problem-kwarg-typo", setp("problems.hyper.modell", "regression"), [], ["problems.hyper.modell", "did you mean 'model'"]),
    ("optimizer-unknown", setp("problems.hyper.optimizer", {"name": "adamm", "lr": 0.1}), [], ["problems.hyper.optimizer.name", "adamm"]),
    ("optimizer-negative-lr", setp("problems.hyper.optimizer", {"name": "adam", "lr": -0.1}), [], ["problems.hyper.optimizer.lr", "-0.1"]),
    ("optimizer-kwarg", setp("problems.hyper.optimizer", {"name": "adam", "lr": 0.1, "momentum": 0.9}), [], ["problems.hyper.optimizer.momentum"]),
    ("no-problems", setp("problems", {}), [], ["problems", "at least one"]),
    ("precision", setp("trainer.precision", "fp8"), [], ["trainer.precision", "fp8"]),
    ("device", setp("trainer.device", "tpu"), [], ["trainer.device", "tpu"]),
    ("on-nonfinite", setp("trainer.on_nonfinite", "ignore"), [], ["trainer.on_nonfinite", "ignore"]),
    ("evaluation-protocol", setp("evaluation", [{"protocol": "lineer"}]), [], ["evaluation[0].protocol", "lineer"]),
    ("override-unknown-key", edit(lambda d: None), ["trainer.stepz=3"], ["trainer.stepz", "no such key"]),
    ("env-missing", setp("data.root", "${env:MLOMAE_SURELY_UNSET_VAR}"), [], ["data.root", "MLOMAE_SURELY_UNSET_VAR"]),
    ("fragment-missing", setp("defaults", ["configs/nope.yaml"]), [], ["defaults", "configs/nope.yaml"]),
    ("missing-data", edit(lambda d: d["data"].update(dataset="cifar10", options={}, root="/nonexistent/data")),
     [], ["cifar10", "/nonexistent/data", "make data"]),
]


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name,mutate,extra,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_experiment_exits_2_with_message(tmp_path, capsys, name, mutate, extra, needles):
    exp = write(tmp_path, mutate(copy.deepcopy(TOY)))
    runs = tmp_path / "runs"
    code, out, err = run_cli(["run", str(exp), "--run-dir", str(runs / "r"), "--no-tracking",
                              f"tracking.runs_dir={runs}", *extra], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert not runs.exists() or not any(runs.iterdir()), "a failed start left files behind"


QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")


@pytest.mark.parametrize("override,needles", [
    ("models.mae.patch_size=5", ["models.mae", "img_size 28 is not divisible by patch_size 5"]),
    ("problems.pretrain.mask_ratio=1.5", ["problems.pretrain", "mask ratio must be in (0, 1)", "1.5"]),
    ("problems.pretrain.mask_ratio=0", ["problems.pretrain", "mask ratio must be in (0, 1)"]),
    ("problems.pretrain.masking=randm", ["problems.pretrain", "'randm'"]),
])
def test_bad_image_experiment(capsys, override, needles):
    code, _, err = run_cli(["validate", QUICKSTART, override], capsys)
    assert code == 2 and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_yaml_syntax_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nproblems: {a: [1, 2}\n")
    code, _, err = run_cli(["validate", str(p)], capsys)
    assert code == 2 and "YAML syntax error at line 2" in err and str(p) in err


def test_user_problem_file_import_error(tmp_path, capsys):
    (tmp_path / "mine.py").write_text("x = 1 / 0\n")
    d = copy.deepcopy(TOY)
    d["problems"]["hyper"]["target"] = "mine.py:Mine"
    code, _, err = run_cli(["validate", str(write(tmp_path, d))], capsys)
    assert code == 2 and "importing" in err and "ZeroDivisionError" in err
    assert "problems.hyper.target" in err


def test_unwritable_run_dir(tmp_path, capsys):
    code, _, err = run_cli(["run", str(ROOT / "experiments" / "toy_bilevel.yaml"), "--no-tracking",
                            "--run-dir", "/proc/mlomae-cannot-write/run"], capsys)
    assert code == 2 and "cannot create the run directory" in err and "/proc/mlomae-cannot-write/run" in err


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "keep.txt").write_text("precious")
    code, _, err = run_cli(["run", str(ROOT / "experiments" / "toy_bilevel.yaml"), "--no-tracking",
                            "--run-dir", str(rd)], capsys)
    assert code == 2 and "exists and is not empty" in err
    assert (rd / "keep.txt").read_text() == "precious" and len(list(rd.iterdir())) == 1


def test_resume_of_a_non_run_dir(tmp_path, capsys):
    code, _, err = run_cli(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a run directory" in err


def test_resume_with_an_experiment_file_too(tmp_path, capsys):
    """`--resume RUN_DIR` takes overrides, not a second experiment: refused, nothing written."""
    (tmp_path / "config.yaml").write_text("name: x\n")
    code, _, err = run_cli(["run", "--resume", str(tmp_path), "experiments/toy_bilevel.yaml"], capsys)
    assert code == 2 and "not both" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_debug_shows_the_traceback(tmp_path, capsys):
    d = copy.deepcopy(TOY)
    d["trainer"]["steps"] = 0
    code, _, err = run_cli(["--debug", "validate", str(write(tmp_path, d))], capsys)
    assert code == 2 and "Traceback" in err


def test_real_process_exit_code(tmp_path):
    """The installed entry point, as a user runs it: exit status 2, no traceback."""
    d = copy.deepcopy(TOY)
    d["hypergrad"] = {"method": "nope"}
    exp = write(tmp_path, d)
    r = subprocess.run([sys.executable, "-m", "mlomae", "validate", str(exp)], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "hypergrad.method" in r.stderr
