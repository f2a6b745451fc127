"""The runner: builds the engine from a config, attaches tracking, checkpoints and progress,
runs, evaluates on the test split at the end, and writes the run directory.

A run directory holds ``config.yaml`` (resolved), ``splits.npz``, ``metrics.jsonl``,
``summary.json``, ``checkpoints/`` and ``mlflow.json``. Nothing is written before the whole
experiment has been built, so a bad file leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from . import checkpoint
from .build import Built, build, config_digest, source_commit, versions
from .callbacks import Metrics, Periodic, Progress
from .config import Config, flatten
from .engine import Callback, Engine, StepRecord
from .errors import ConfigError, MlomaeError, NonFiniteError
from .tracking import RunDir, Tracker, atomic_write_text, warn


class Stopped(Exception):
    """A signal asked the run to stop; a checkpoint was written first."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg["tracking"]["runs_dir"]) / f"{cfg['name']}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _prepare_dir(path: Path, key: str) -> RunDir:
    if path.exists() and any(path.iterdir()):
        raise ConfigError("run directory exists and is not empty", key=key, value=str(path),
                          hint="resume it with --resume, or choose another --run-dir")
    try:
        return RunDir(path).create()
    except OSError as e:
        raise ConfigError(f"cannot create the run directory: {e.strerror}", key=key,
                          value=str(path)) from None


class _StopOnSignal(Callback):
    """Checkpoint and stop at the end of the outer step in which a signal arrived. With several
    processes they agree first (the largest signal number any of them received, 0 for none),
    so that all take part in the checkpoint (it gathers their random states) and stop together."""

    def __init__(self, save: Callable[[Engine, int], None], world: int = 1):
        self.save, self.signum, self.world = save, None, world

    def on_outer_step(self, engine: Engine, step: int, records: list[StepRecord]) -> None:
        checkpoint._fault(f"kill-after-step:{step}")
        signum = self.signum or 0
        if self.world > 1:
            from .distributed import max_over_ranks
            signum = max_over_ranks(signum, self.world)
        if signum:
            self.save(engine, step)
            raise Stopped(signum)


def _processes(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


def _ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}..{last}"


def _rank_note(saved: int | None, world: int, name: str) -> str | None:
    """The one line a resume prints when not every rank gets back its own random states."""
    if saved is None:   # a checkpoint from before per-rank states: rank 0's only
        return (f"{name} predates per-rank random states: {_ranks(1, world - 1)} draw fresh "
                f"random streams") if world > 1 else None
    if saved == world:
        return None
    tail = (f"{_ranks(saved, world - 1)} draw fresh random streams" if world > saved else
            f"the random streams of {_ranks(world, saved - 1)} are dropped")
    return f"resharding from {saved} to {_processes(world)} (--reshard): {tail}"


class Runner:
    def __init__(self, cfg: Config, *, run_dir: str | os.PathLike | None = None, resume: bool = False,
                 tracking: bool = True, parent_run_id: str | None = None, stream=None,
                 rank: int = 0, world: int = 1, reshard: bool = False):
        self.cfg, self.resume, self.rank, self.world = cfg, resume, rank, world
        self.reshard = reshard
        self.stream = stream or sys.stderr
        self.tracking = tracking and cfg["tracking"]["enabled"]
        self.parent_run_id = parent_run_id
        self.built: Built = build(cfg, rank=rank, world=world)
        self.engine = self.built.engine
        self.digest = config_digest(cfg)
        self.wall_before = 0.0
        self.code: list[str | None] = [source_commit()] if rank == 0 else []
        self.train_seconds: float | None = None
        self.metrics_state = None
        self.metrics: Metrics | None = None
        self.main = rank == 0
        self.tracker: Tracker | None = None
        key = "--run-dir" if run_dir else "tracking.runs_dir"
        self._check_test_split()
        if self.main:
            chosen, why = self.built.precision
            print(f"precision: {chosen} ({why})", file=self.stream)
        if resume:
            self.run_dir = RunDir(run_dir)
            self._restore()
        else:
            path = Path(run_dir) if run_dir else default_run_dir(cfg)
            self.run_dir = _prepare_dir(path, key) if self.main else RunDir(path)
            if self.main:
                self.run_dir.open_metrics()
                atomic_write_text(self.run_dir.path / "config.yaml", cfg.to_yaml())
                if self.built.data is not None:
                    from .data import save_split_indices
                    save_split_indices(self.run_dir.path, self.built.data.indices,
                                       specs=self.built.data.specs, seed=cfg["seed"])

    def _check_test_split(self) -> None:
        data = self.built.data
        if data is None:
            return
        for name, spec in self.cfg["problems"].items():
            if spec["data"] is not None and (spec["data"] == "test" or data.source(spec["data"]) == "test"):
                raise self.cfg.error("trains on the test split; the test split is for final "
                                     "evaluation only", key=f"problems.{name}.data", value=spec["data"])

    # -- resume -------------------------------------------------------------------------------
    def _restore(self) -> None:
        found = checkpoint.load_latest(self.run_dir.checkpoints, report=self.main)
        if found is None:
            raise ConfigError("no usable checkpoint to resume from", key="--resume",
                              value=str(self.run_dir.path))
        path, state = found
        if state.get("digest") != self.digest:
            raise ConfigError(f"checkpoint {path} belongs to another experiment (config digest "
                              f"{state.get('digest')} != {self.digest})", key="--resume",
                              value=str(self.run_dir.path))
        saved_world = checkpoint.world_size_of(state)
        if saved_world is not None and saved_world != self.world and not self.reshard:
            raise ConfigError(
                f"checkpoint {path.name} was written by {_processes(saved_world)} and this run "
                f"has {_processes(self.world)}: an exact resume needs the same number", key="--resume",
                value=str(self.run_dir.path),
                hint=f"resume with {saved_world} (torchrun --nproc_per_node={saved_world}), or add "
                     f"--reshard to continue with {self.world} (the data are then split "
                     f"{self.world} ways; ranks without saved random states draw fresh ones)")
        self.engine.load_state_dict(state["engine"])
        own = checkpoint.rank_rng(state, self.rank)
        if own is not None:
            checkpoint.set_rng_state(own)
        else:   # nothing saved for this rank (--reshard, or an older checkpoint): a fresh stream
            from .build import rank_seed, seed_everything
            seed_everything(rank_seed(self.cfg["seed"], self.rank, self.engine.outer_step))
        self.metrics_state = state.get("metrics")
        self.wall_before = float(state.get("wall_time", 0.0))
        # the commits that trained it so far, oldest first (None: unknown, an older checkpoint)
        before = list(state["code"]) if "code" in state else [None]
        self.code = before + [c for c in self.code if not before or c != before[-1]]
        if self.main:
            self.run_dir.open_metrics(truncate_to=int(state["metrics_lines"]))
        if self.main:   # one line per run, not per process
            print(f"resuming {self.run_dir.path} from {path.name} (outer step "
                  f"{self.engine.outer_step})", file=self.stream)
            note = _rank_note(saved_world, self.world, path.name)
            if note:
                print(note, file=self.stream)

    def save_checkpoint(self, engine: Engine, step: int) -> None:
        """Rank 0 writes the checkpoint, with every rank's random states (gathered: every rank
        calls this at the same steps)."""
        from .distributed import gather_to_main
        rngs = gather_to_main(checkpoint.rng_state(), self.rank, self.world)
        if not self.main:
            return
        self.run_dir.flush()
        state = {"engine": engine.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                 "world_size": self.world, "metrics_lines": self.run_dir.lines, "digest": self.digest,
                 "metrics": self.metrics.state_dict() if self.metrics else None,
                 "code": self.code,
                 "wall_time": self.wall_before + (time.perf_counter() - self.t0)}
        checkpoint.save(self.run_dir.checkpoints, step, state,
                        keep=self.cfg["trainer"]["keep_checkpoints"])

    # -- running ------------------------------------------------------------------------------
    def _validate_hook(self, metrics: Metrics) -> Callable[[Engine, int], None]:
        def run(engine: Engine, step: int) -> None:
            rec: dict[str, Any] = {"step": step, "time": time.time()}
            for name, p in engine.problems.items():
                fn = getattr(p, "validate", None)
                if callable(fn):
                    for k, v in fn().items():
                        rec[f"{name}/val_{k}"] = float(v)
            if len(rec) > 2:
                metrics.emit(rec)
        return run

    def run(self) -> dict[str, Any]:
        cfg, tr = self.cfg, self.cfg["trainer"]
        total = tr["steps"]
        if self.main and self.tracking:
            self.tracker = Tracker(self.run_dir, cfg["tracking"]["uri"], cfg["tracking"]["experiment"],
                                   run_name=cfg["tracking"]["run_name"] or self.run_dir.path.name,
                                   params=flatten({k: v for k, v in cfg.data.items() if k != "tracking"}),
                                   tags={"mlomae.config_file": str(cfg.file), "mlomae.digest": self.digest},
                                   parent_run_id=self.parent_run_id).start()
        metrics = Metrics(self.run_dir if self.main else None, self.tracker, tr["log_every"], total)
        if self.metrics_state:
            metrics.load_state_dict(self.metrics_state)
        self.metrics = metrics
        stopper = _StopOnSignal(self.save_checkpoint, self.world)
        cbs: list[Callback] = [metrics]
        if self.main:
            cbs.append(Progress(total, metrics, self.stream))
        if tr["eval_every"]:
            cbs.append(Periodic(tr["eval_every"], total, self._validate_hook(metrics)))
        if tr["check_hypergrad_every"]:   # before the checkpoint: it saves the state checked
            from .callbacks import HypergradCheck
            cbs.append(HypergradCheck(self.built, metrics, tr["check_hypergrad_every"],
                                      tr["check_hypergrad_methods"], self.rank, self.world))
        # always a final checkpoint: `mlomae eval`, `masks` and `export` reload it
        cbs.append(Periodic(tr["checkpoint_every"], total, self.save_checkpoint, at_end=True))
        cbs.append(stopper)
        self.engine.callbacks = cbs
        previous = {}

        def handler(signum, frame):
            stopper.signum = signum

        if threading_main():   # every process: they agree on the stop (_StopOnSignal)
            for s in (signal.SIGTERM, signal.SIGINT):
                previous[s] = signal.signal(s, handler)
        self.t0 = time.perf_counter()
        status, error, evals, pictures = "FINISHED", None, {}, {}
        self.train_seconds = None
        try:
            self.engine.run(total)
            self.train_seconds = self.wall_before + (time.perf_counter() - self.t0)
            evals = self.evaluate()
            pictures = self.pictures()
        except Stopped as e:
            status, error = "KILLED", str(e)
            raise
        except NonFiniteError as e:
            status, error = "FAILED", str(e)
            raise
        except BaseException as e:
            status, error = "FAILED", f"{type(e).__name__}: {e}"
            raise
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            summary = self._summary(status, error, metrics, evals)
            if pictures:
                summary["pictures"] = {k: str(p.relative_to(self.run_dir.path)) for k, p in pictures.items()}
            if self.resume and self.main:
                # results added to this run after it stopped (`mlomae eval`, `masks`) stay
                self._keep_earlier_results(summary)
            if self.main:
                self.run_dir.write_json("summary.json", summary)
                self.run_dir.close()
                if self.tracker is not None:
                    self.tracker.finish("FINISHED" if status == "FINISHED" else
                                        ("KILLED" if status == "KILLED" else "FAILED"),
                                        artifacts=[self.run_dir.path / "config.yaml",
                                                   self.run_dir.path / "summary.json"])
        return summary

    def pictures(self) -> dict[str, Path]:
        """Masks, reconstructions, mask heat map and curves, for runs that draw masks."""
        if not self.main or self.built.data is None or "test" not in self.built.data.indices:
            return {}
        if not any(callable(getattr(p, "reconstruct", None)) for p in self.built.problems.values()):
            return {}
        from .eval.pictures import make_pictures
        self.run_dir.flush()
        try:
            return make_pictures(self.built, self.run_dir.path, self.run_dir.path / "pictures")
        except (MlomaeError, OSError, ValueError) as e:
            warn(f"pictures not drawn: {e}")
            return {}

    def evaluate(self) -> dict[str, Any]:
        """The experiment's final evaluations: the only reader of the test split (rank 0)."""
        results: dict[str, Any] = {}
        if not self.main:
            return results
        for i, spec in enumerate(self.cfg.get("evaluation") or []):
            from .eval import run_protocol
            key = f"evaluation[{i}]"
            out = run_protocol(self.built, spec, self.run_dir.path, key=key)
            results.update(out)
            if self.main and out:
                line = self.run_dir.lines
                rec = {"step": self.engine.outer_step, "time": time.time(),
                       **{f"eval/{k}": v for k, v in out.items() if isinstance(v, (int, float))}}
                self.run_dir.append(rec)
                if self.tracker is not None:
                    self.tracker.log(line, rec)
        return results

    def _keep_earlier_results(self, summary: dict) -> None:
        from .eval.rundir import read_summary
        before = read_summary(self.run_dir.path)
        for key in ("eval", "pictures"):
            if isinstance(before.get(key), dict):
                summary[key] = {**before[key], **(summary.get(key) or {})}

    def _summary(self, status: str, error: str | None, metrics: Metrics, evals: dict) -> dict:
        wall = self.wall_before + (time.perf_counter() - self.t0)
        return {
            "name": self.cfg["name"], "experiment": self.cfg["tracking"]["experiment"],
            "status": status, "error": error, "config_file": str(Path(self.cfg.file).resolve()),
            "outer_steps": self.engine.outer_step, "target_steps": self.cfg["trainer"]["steps"],
            "problem_steps": {n: p.step_count for n, p in self.engine.problems.items()},
            "skipped_steps": {n: p.skipped for n, p in self.engine.problems.items()},
            "schedule": self.engine.schedule,
            "wall_time_seconds": wall, "train_seconds": self.train_seconds,
            "device": str(self.built.device),
            "final_metrics": {k: v for k, v in metrics.last.items() if k != "step"},
            "eval": evals, "versions": versions(), "code": self.code, "digest": self.digest,
            "precision": self.built.precision[0],
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def run(cfg: Config, **kwargs: Any) -> tuple[dict[str, Any], Path]:
    runner = Runner(cfg, **kwargs)
    summary = runner.run()
    return summary, runner.run_dir.path
