"""A real ``mlflow server`` for tests on 127.0.0.1, artifacts served by the server; its backend store in a
PostgreSQL database (a team's setup) or a SQLite file."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deployments.team_servers import Postgres
from tests.support.processes import free_port, http_ok, spawn, stop, wait_for

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class MlflowServer:
    url: str
    root: Path
    log: Path


@contextmanager
def mlflow_server(root: Path, postgres: Postgres | None = None, database: str = "mlflow") -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free port under ``root``, its runs and models in ``database`` of ``postgres``
    or else in ``root/mlflow.db``; stopped (with its workers) on exit."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job consumers: tests run no MLflow jobs
    store = postgres.url(database) if postgres else f"sqlite:///{root / 'mlflow.db'}"
    env.update(postgres.client_env() if postgres else {})
    proc = spawn([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", store,
                  "--artifacts-destination", str(root / "artifacts")], env, root, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_ok(f"{url}/health"), START_TIMEOUT_S, f"mlflow server on port {port}", log, proc)
        yield MlflowServer(url, root, log)
    finally:
        stop(proc)
