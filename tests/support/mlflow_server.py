"""A real ``mlflow server`` for tests: SQLite backend store, artifacts served by the server, 127.0.0.1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import free_port, http_ok, spawn, stop, wait_for

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class MlflowServer:
    url: str
    root: Path
    log: Path


@contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free port under ``root``; stopped (with its workers) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job consumers: tests run no MLflow jobs
    proc = spawn([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                  "--artifacts-destination", str(root / "artifacts")], env, root, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/health"), START_TIMEOUT_S, f"mlflow server on port {port}", log, proc)
        yield MlflowServer(url, root, log)
    finally:
        stop(proc)
