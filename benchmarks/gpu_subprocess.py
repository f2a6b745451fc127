"""The GPU check's steps that run in subprocesses, started first and collected later, so that
they run side by side before anything in the calling process is timed: the suite's CUDA tests
(``pytest -m cuda``, counted from its JUnit XML) and ``torchrun`` of ``mlomae run`` (counted from
the run's summary.json). benchmarks/gpu_check.py calls them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import common

REPO = common.ROOT.parent
EXPERIMENTS = REPO / "experiments"


class Launched:
    """A subprocess started now and collected later (the checks in subprocesses run side by
    side, before anything in this process is timed); output goes to files, not pipes."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name)
        self.log = open(self.path / "output.txt", "w+")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)

    def wait(self) -> tuple[int, str, float]:
        rc = self.proc.wait()
        seconds = time.perf_counter() - self.t0
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        return rc, output, seconds

    def close(self) -> None:
        self.dir.cleanup()


# -- 1. the CUDA tests ------------------------------------------------------------------------

def start_cuda_tests(dry: bool) -> Launched:
    """``pytest -m cuda tests/test_cuda.py`` with a JUnit XML report. In a dry run the GPU is
    hidden from it, so every test reports itself skipped."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.pop("MLOMAE_CUDA_TEST_DEVICE", None)
    xml_dir = tempfile.mkdtemp()
    run = Launched([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                    f"--junitxml={xml_dir}/cuda.xml", "tests/test_cuda.py"], REPO, env)
    run.xml = Path(xml_dir) / "cuda.xml"
    return run


def finish_cuda_tests(run: Launched) -> dict:
    """Counts from the JUnit XML: passed, skipped (with the reasons), failed."""
    rc, output, seconds = run.wait()
    out = {"returncode": rc, "seconds": seconds, "tests": 0, "passed": 0, "skipped": 0,
           "failed": 0, "skip_reasons": [], "failures": []}
    if not run.xml.exists():
        out["failures"] = [output[-2000:]]
        out["failed"] = 1
    else:
        for case in ET.parse(run.xml).getroot().iter("testcase"):
            out["tests"] += 1
            skipped = case.find("skipped")
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            if skipped is not None:
                out["skipped"] += 1
                reason = skipped.get("message", "")
                if reason not in out["skip_reasons"]:
                    out["skip_reasons"].append(reason)
            elif failed is not None:
                out["failed"] += 1
                out["failures"].append(f"{case.get('name')}: {failed.get('message', '')[:300]}")
            else:
                out["passed"] += 1
        run.xml.unlink()
        run.xml.parent.rmdir()
    run.close()
    return out


# -- 2. torchrun ------------------------------------------------------------------------------

def fashion_mnist_present() -> bool:
    from mlomae.data import build_dataset
    from mlomae.errors import MlomaeError
    try:
        build_dataset("fashion_mnist", split="test")
        return True
    except MlomaeError:
        return False


def start_torchrun(experiment: str, device: str, steps: int, nproc: int, dry: bool) -> Launched:
    """One ``torchrun --standalone`` of ``mlomae run`` for ``steps`` outer steps."""
    overrides = [f"trainer.device={device}", f"trainer.steps={steps}", "trainer.log_every=1",
                 "evaluation=[]"]
    data_note = None
    if experiment == "quickstart":
        if not fashion_mnist_present():   # nothing is downloaded: the same shape, generated
            data_note = "Fashion-MNIST absent: synthetic_imagenet at 1 x 28 x 28, 10 classes"
            overrides += ["data.dataset=synthetic_imagenet",
                          "+data.options={n: 2000, n_test: 100, num_classes: 10, channels: 1, "
                          "image_size: 28}"]
        if dry:
            overrides += ["problems.mask.batch_size=2"]
    if dry:
        overrides += ["trainer.threads=1", "data.batch_size=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    workdir = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "mlomae", "run",
           str(EXPERIMENTS / f"{experiment}.yaml"), "--run-dir", str(workdir / "run"),
           "--no-tracking", *overrides]
    run = Launched(cmd, workdir, env)
    run.info = {"experiment": experiment, "nproc": nproc, "device": device,
                "backend": "nccl" if device.startswith("cuda") else "gloo",
                "process_group": nproc > 1, "requested_steps": steps, "overrides": overrides,
                "data": data_note or "as configured"}
    run.workdir = workdir
    return run


def finish_torchrun(run: Launched) -> dict:
    """The run's counts from its summary.json, and the expected ones from its schedule."""
    rc, output, seconds = run.wait()
    out = {**run.info, "returncode": rc, "seconds": seconds}
    summary = run.workdir / "run" / "summary.json"
    if rc != 0 or not summary.exists():
        out.update(error=output[-3000:], outer_steps=None, problem_steps=None,
                   expected_problem_steps=None)
    else:
        s = json.loads(summary.read_text())
        steps = run.info["requested_steps"]
        out.update(outer_steps=s["outer_steps"], problem_steps=s["problem_steps"],
                   expected_problem_steps={p: s["schedule"].count(p) * steps
                                           for p in s["problem_steps"]},
                   status=s["status"], run_device=s.get("device"))
    shutil.rmtree(run.workdir, ignore_errors=True)
    run.close()
    return out
