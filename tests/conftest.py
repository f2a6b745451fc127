import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import socket
import subprocess
import time

import pytest


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One sqlite tracking database for the whole session (a new one costs ~2 s of migrations)."""
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on a free loopback port, stopped by the caller."""

    def __init__(self, workdir):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.proc = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.log = open(os.path.join(self.workdir, "server.log"), "w")
        self.proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.workdir}/server.db",
             "--artifacts-destination", f"{self.workdir}/artifacts"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        import urllib.request
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited: " + open(self.log.name).read()[-2000:])
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(str(tmp_path)).start()
    yield server
    server.stop()
