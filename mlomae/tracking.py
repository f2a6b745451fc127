"""Run directories and MLflow tracking.

Every run writes its own directory (resolved config, ``metrics.jsonl``, ``summary.json``,
checkpoints, pictures). MLflow gets the same records from a background thread in batches, off
the training path. If the tracking server is unreachable at start or dies mid-run, training
goes on, the records stay in ``metrics.jsonl``, a warning says so, and the thread retries;
``mlomae sync RUN_DIR`` delivers whatever is still missing later. ``mlflow.json`` in the run
directory remembers the run id and how many lines of ``metrics.jsonl`` MLflow already has.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

# A dead server must cost seconds, not MLflow's default minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file, flush, fsync and rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """One run's directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self._metrics = None
        self.lines = 0

    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        return self

    def open_metrics(self, truncate_to: int | None = None) -> None:
        """Open for appending; on resume, drop lines written after the checkpoint."""
        if truncate_to is not None and self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines(keepends=True)[:truncate_to]
            atomic_write_text(self.metrics_path, "".join(lines))
        self.lines = sum(1 for _ in open(self.metrics_path)) if self.metrics_path.exists() else 0
        self._metrics = open(self.metrics_path, "a", buffering=1)

    def append(self, record: Mapping[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self.lines += 1

    def flush(self) -> None:
        if self._metrics is not None:
            self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _ensure_sqlite_dir(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep their artifacts: beside a sqlite store, ``mlartifacts/`` in
    the store's folder as an absolute file URI (MLflow's own default is ``./mlruns`` relative to
    the directory a command happens to start in, which scatters artifacts and hides them from
    an ``mlflow ui`` started elsewhere); None for a server, which decides for itself."""
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        return (store.parent / "mlartifacts").as_uri()
    return None


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (artifacts at ``artifact_root``) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def _metrics_of(record: Mapping[str, Any]):
    from mlflow.entities import Metric
    ts = int(record.get("time", time.time()) * 1000)
    step = int(record.get("step", 0))
    return [Metric(k, float(v), ts, step) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]


class Tracker:
    """Delivers a run's records to MLflow from a background thread.

    ``log(record)`` is cheap: it queues. Records are also expected to be in the run's
    ``metrics.jsonl`` (the runner writes them there first), which is what ``sync`` replays.
    """

    def __init__(self, run_dir: RunDir, uri: str, experiment: str, run_name: str | None = None,
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                 parent_run_id: str | None = None, flush_seconds: float = 2.0,
                 retry_seconds: float = 15.0):
        self.run_dir, self.uri, self.experiment = run_dir, uri, experiment
        self.run_name, self.params = run_name, dict(params or {})
        self.tags = dict(tags or {})
        if parent_run_id:
            self.tags["mlflow.parentRunId"] = parent_run_id
        self.flush_seconds, self.retry_seconds = flush_seconds, retry_seconds
        self.run_id: str | None = None
        self.delivered = 0
        self.online = False
        self._warned = False
        self._q: queue.Queue = queue.Queue()
        self._pending: list[tuple[int, Mapping[str, Any]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._next_try = 0.0
        self._lock = threading.RLock()
        state = self._state()
        self.run_id = state.get("run_id")
        self.delivered = int(state.get("delivered_lines", 0))

    # -- state in the run directory -------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        p = self.run_dir.path / "mlflow.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def _save_state(self) -> None:
        self.run_dir.write_json("mlflow.json", {"uri": self.uri, "experiment": self.experiment,
                                                "run_id": self.run_id,
                                                "delivered_lines": self.delivered})

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Create or reopen the MLflow run; False (and a warning) if the server is away."""
        try:
            _ensure_sqlite_dir(self.uri)
            client = _client(self.uri)
            if self.run_id is None:
                exp_id = experiment_id(client, self.experiment, self.uri)
                run = client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
                self.run_id = run.info.run_id
                self._client = client
                self._log_params()
            else:
                client.get_run(self.run_id)
                client.update_run(self.run_id, status="RUNNING")
                self._client = client
            self._save_state()
            if self._warned:
                warn(f"tracking server {self.uri} reachable again; sending queued metrics")
                self._warned = False
            self.online = True
            return True
        except Exception as e:  # any transport or server error: keep training
            self._offline(e)
            return False

    def _offline(self, e: Exception) -> None:
        self.online = False
        self._next_try = time.monotonic() + self.retry_seconds
        if not self._warned:
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            warn(f"MLflow tracking at {self.uri} is unreachable ({msg}); training continues, "
                 f"metrics stay in {self.run_dir.metrics_path} and are retried; "
                 f"'mlomae sync {self.run_dir.path}' delivers them later")
            self._warned = True

    def _log_params(self) -> None:
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in sorted(self.params.items())]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    # -- the background thread --------------------------------------------------------------
    def start(self) -> "Tracker":
        self._connect()
        self._thread = threading.Thread(target=self._loop, name="mlomae-tracking", daemon=True)
        self._thread.start()
        return self

    def log(self, line_no: int, record: Mapping[str, Any]) -> None:
        """Queue ``record``, which is line ``line_no`` (0-based) of metrics.jsonl."""
        self._q.put((line_no, dict(record)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=self.flush_seconds)
            self._send()
        self._drain(timeout=0)
        self._send()

    def _drain(self, timeout: float) -> None:
        try:
            item = self._q.get(timeout=timeout) if timeout else self._q.get_nowait()
            self._pending.append(item)
            while True:
                self._pending.append(self._q.get_nowait())
        except queue.Empty:
            pass

    def _send(self) -> None:
        with self._lock:
            if not self._pending:
                return
            if not self.online:
                if time.monotonic() < self._next_try or not self._connect():
                    return
            todo = [(n, r) for n, r in self._pending if n >= self.delivered]
            try:
                batch, last = [], None
                for n, r in todo:
                    batch.extend(_metrics_of(r))
                    last = n
                    if len(batch) >= 900:
                        self._client.log_batch(self.run_id, metrics=batch)
                        self.delivered, batch = last + 1, []
                if batch:
                    self._client.log_batch(self.run_id, metrics=batch)
                if last is not None:
                    self.delivered = last + 1
                self._pending = []
                self._save_state()
            except Exception as e:
                self._pending = [(n, r) for n, r in self._pending if n >= self.delivered]
                self._save_state()
                self._offline(e)

    # -- the end ------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED", artifacts: Iterable[str | os.PathLike] = (),
               timeout: float = 30.0) -> bool:
        """Flush, upload artifacts, close the run. True if everything was delivered."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        if not self.online and not self._connect():
            warn(f"metrics not delivered to {self.uri}; run 'mlomae sync {self.run_dir.path}' "
                 "when it is reachable")
            return False
        with self._lock:
            self._send()
            if not self.online:
                return False
            try:
                for a in artifacts:
                    a = Path(a)
                    if a.is_dir():
                        self._client.log_artifacts(self.run_id, str(a), artifact_path=a.name)
                    elif a.exists():
                        self._client.log_artifact(self.run_id, str(a))
                self._client.set_terminated(self.run_id, status=status)
                return True
            except Exception as e:
                self._offline(e)
                return False


def sync(run_dir: str | os.PathLike, uri: str | None = None) -> tuple[int, str]:
    """Deliver the lines of ``metrics.jsonl`` MLflow does not have yet. Returns (count, run id)."""
    rd = RunDir(run_dir)
    state = rd.read_json("mlflow.json") if (rd.path / "mlflow.json").exists() else {}
    summary = rd.read_json("summary.json") if (rd.path / "summary.json").exists() else {}
    cfg = rd.path / "config.yaml"
    experiment = state.get("experiment") or summary.get("experiment") or rd.path.name
    uri = uri or state.get("uri") or "sqlite:///runs/mlflow.db"
    tracker = Tracker(rd, uri, experiment, run_name=rd.path.name)
    if not tracker._connect():
        raise ConnectionError(f"MLflow at {uri} is still unreachable")
    start = tracker.delivered
    lines = rd.metrics_path.read_text().splitlines() if rd.metrics_path.exists() else []
    for n, line in enumerate(lines):
        if n >= start and line.strip():
            tracker._pending.append((n, json.loads(line)))
    tracker._send()
    if not tracker.online:
        raise ConnectionError(f"MLflow at {uri} failed while syncing")
    arts = [p for p in (cfg, rd.path / "summary.json") if p.exists()]
    for a in arts:
        tracker._client.log_artifact(tracker.run_id, str(a))
    status = "FINISHED" if summary.get("status", "FINISHED") == "FINISHED" else "FAILED"
    tracker._client.set_terminated(tracker.run_id, status=status)
    return len(lines) - start, tracker.run_id
