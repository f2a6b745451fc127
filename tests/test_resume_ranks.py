"""Exact resume on every rank of a two-process run (gloo, CPU).

Each process draws its own masks and noise, so each has its own random states; the checkpoint
holds all of them. Two processes killed with SIGKILL after an outer step (MLOMAE_FAULT) and
resumed end bit-identical — parameters, optimizer states and every rank's random states in the
final checkpoint, and metrics.jsonl — to the same two processes left alone: for the MAE with
random masks, and for the MLO-MAE graph (sampled masks) under DARTS. A resume with another
number of processes is refused (exit 2) unless ``--reshard`` asks for it; an older checkpoint
(rank 0's random state only) still resumes a one-process run exactly.

The two processes are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
each with its own output files, so that what each rank prints can be checked. One-process
runs go through ``mlomae.cli.main`` in this process (no interpreter start-up to pay).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from test_experiments import tiny_overrides
from test_problems_tiny import one_thread  # noqa: F401  (an autouse fixture)
from test_resume import same_state, strip

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"
STEPS = 6
COMMON = ["--no-tracking", f"trainer.steps={STEPS}", "trainer.checkpoint_every=3",
          "trainer.keep_checkpoints=10", "trainer.threads=1", "trainer.precision=fp32"]
CASES = {
    # MAE, uniform random masks, with the online probe
    "mae_random": ("mae_random.yaml", []),
    # MLO-MAE's three levels, masks sampled from the masker's logits (the quickstart's masker)
    # (unroll takes the same path through the checkpoint; it passes too, at another ~30 s)
    "mlo_darts": ("quickstart.yaml", ["problems.mask.batch_size=8", "hypergrad.method=darts"]),
}
pytestmark = pytest.mark.slow


def env_for(rank: int | None, world: int, port: int, fault: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("MLOMAE_FAULT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    if fault:
        env["MLOMAE_FAULT"] = fault
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def mlomae(args: list[str], logs: Path, world: int = 2, fault: str | None = None,
           timeout: float = 300) -> list[tuple[int, str, str]]:
    """``mlomae ARGS`` in ``world`` processes; (exit code, stdout, stderr) of each rank."""
    logs.mkdir(parents=True, exist_ok=True)
    port, procs = free_port(), []
    for rank in range(world):
        out = open(logs / f"rank{rank}.out", "w")
        err = open(logs / f"rank{rank}.err", "w")
        env = env_for(rank if world > 1 else None, world, port, fault)
        procs.append((subprocess.Popen([sys.executable, "-m", "mlomae", "run", *args], stdout=out,
                                       stderr=err, env=env, cwd=ROOT), out, err))
    results = []
    try:
        for rank, (p, out, err) in enumerate(procs):
            p.wait(timeout=timeout)
            out.close()
            err.close()
            results.append((p.returncode, (logs / f"rank{rank}.out").read_text(),
                            (logs / f"rank{rank}.err").read_text()))
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def succeeded(results):
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}: {err[-3000:]}"
    return results


def experiment(case: str) -> list[str]:
    name, extra = CASES[case]
    return [str(EXP / name), *tiny_overrides(name), *extra, *COMMON]


def outcome(rd: Path):
    lines = [strip(json.loads(x)) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(rd / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)
    summary = json.loads((rd / "summary.json").read_text())
    return lines, state, summary


def only_rank0_speaks(results):
    """Progress, the resume line and the run directory come from rank 0 alone."""
    (_, out0, err0), (_, out1, err1) = results
    assert out0.count("run directory:") == 1 and f"step {STEPS}/{STEPS}" in err0
    assert out1 == "", out1
    assert not any(w in err1 for w in ("step ", "resuming", "run directory", "precision")), err1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per case: the two processes left alone, and the two killed after step 4 (the last
    checkpoint at step 3), on demand."""
    base, cache = tmp_path_factory.mktemp("ranks"), {}

    def get(case: str, kind: str) -> Path:
        if (case, kind) not in cache:
            rd = base / f"{case}-{kind}"
            args = [*experiment(case), "--run-dir", str(rd)]
            if kind == "ref":
                only_rank0_speaks(succeeded(mlomae(args, base / f"{case}-ref-logs")))
            else:
                results = mlomae(args, base / f"{case}-kill-logs", fault="kill-after-step:4")
                assert [c for c, _, _ in results] == [-signal.SIGKILL] * 2, results
                assert (rd / "checkpoints" / "step_00000003.pt").exists()
            cache[case, kind] = rd
        return cache[case, kind]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_on_both_ranks_then_resume_is_bit_identical(tmp_path, runs, case):
    rd = tmp_path / "run"
    shutil.copytree(runs(case, "killed"), rd)
    results = succeeded(mlomae(["--resume", str(rd), "--no-tracking"], tmp_path / "logs"))
    assert "from step_00000003.pt" in results[0][2]
    assert "fresh random" not in results[0][2]
    only_rank0_speaks(results)
    lines, state, summary = outcome(rd)
    ref_lines, ref_state, ref_summary = outcome(runs(case, "ref"))
    assert len(lines) == len(ref_lines) and lines == ref_lines
    assert same_state(state["engine"], ref_state["engine"])
    assert state["world_size"] == 2 and same_state(state["rng_ranks"], ref_state["rng_ranks"])
    assert strip(summary["final_metrics"]) == strip(ref_summary["final_metrics"])
    assert summary["eval"] == ref_summary["eval"]
    # the ranks really draw streams of their own: rank 1's state is not rank 0's
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def cli(args: list[str], capsys) -> tuple[int, str]:
    """``mlomae ARGS`` in this process, as one process: (exit code, stderr)."""
    from mlomae.cli import main
    code = main(args)
    return code, capsys.readouterr().err


def test_another_world_size_is_refused_unless_resharded(tmp_path, runs, capsys, monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MLOMAE_FAULT"):
        monkeypatch.delenv(k, raising=False)
    rd = tmp_path / "run"
    shutil.copytree(runs("mae_random", "killed"), rd)
    files = lambda: {p.name: p.read_bytes() for p in [rd / "metrics.jsonl", *(rd / "checkpoints").iterdir()]}  # noqa: E731
    before = files()
    code, err = cli(["run", "--resume", str(rd), "--no-tracking"], capsys)
    assert code == 2, err[-3000:]
    assert "'--resume'" in err and "written by 2 processes" in err and "this run has 1 process" in err
    assert "--reshard" in err and "Traceback" not in err
    assert files() == before   # refused before anything was touched
    # asked to reshard: one process continues from the checkpoint and says so in one line
    code, err = cli(["run", "--resume", str(rd), "--no-tracking", "--reshard"], capsys)
    assert code == 0, err[-3000:]
    assert [x for x in err.splitlines() if "resharding" in x] == [
        "resharding from 2 to 1 process (--reshard): the random streams of rank 1 are dropped"]
    s = json.loads((rd / "summary.json").read_text())
    assert s["status"] == "FINISHED" and s["outer_steps"] == STEPS
    assert torch.load(rd / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)["world_size"] == 1
    # --reshard only with --resume
    code, err = cli(["run", str(EXP / "toy_bilevel.yaml"), "--reshard"], capsys)
    assert code == 2 and "needs --resume" in err


def test_checkpoint_with_rank0_state_only_still_resumes_one_process_exactly(tmp_path, capsys):
    """A checkpoint of the format before per-rank states (``rng`` alone, no ``world_size``)."""
    from mlomae import checkpoint
    ref, rd = tmp_path / "ref", tmp_path / "run"
    code, err = cli(["run", *experiment("mae_random"), "--run-dir", str(ref)], capsys)
    assert code == 0, err[-3000:]
    shutil.copytree(ref, rd)
    for f in (f"step_{STEPS:08d}.pt", f"step_{STEPS:08d}.pt.sha256"):
        (rd / "checkpoints" / f).unlink()
    state = checkpoint.load(rd / "checkpoints" / "step_00000003.pt")
    assert state["world_size"] == 1 and same_state(state["rng_ranks"][0], state["rng"])
    del state["rng_ranks"], state["world_size"]
    checkpoint.save(rd / "checkpoints", 3, state, keep=0)
    code, err = cli(["run", "--resume", str(rd), "--no-tracking"], capsys)
    assert code == 0, err[-3000:]
    assert "from step_00000003.pt" in err and "predates" not in err
    a, b = outcome(rd)[1], outcome(ref)[1]
    assert same_state(a["engine"], b["engine"]) and same_state(a["rng"], b["rng"])
    assert outcome(rd)[0] == outcome(ref)[0]
