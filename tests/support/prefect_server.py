"""One real Prefect server for the whole test run: ``prefect server start`` on 127.0.0.1, its own PREFECT_HOME.

Tests that need a server take the session fixture ``prefect_server`` (conftest); subprocesses get
``server.env``, which points them at it and at nothing else of the developer's machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun

from deployments.team_servers import Postgres
from tests.support.processes import free_port, http_ok, spawn, stop, wait_for

PREFECT = str(Path(sys.executable).with_name("prefect"))
SERVER_START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@dataclass
class Server:
    url: str
    env: dict[str, str]
    root: Path

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with SyncPrefectClient(self.url) as client:
            yield client

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``prefect <args>`` against this server; output captured as text."""
        return subprocess.run([PREFECT, *args], env={**self.env, **(env or {})}, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout)

    def deployment(self, name: str):
        with self.client() as client:
            return client.read_deployment_by_name(name)

    def pause(self, name: str) -> None:
        """Pause deployment ``name``'s schedule (which deletes its scheduled runs; runs asked for still run): a
        suite running across 02:00 UTC would otherwise start a full night beside the tests."""
        with self.client() as client:
            client.pause_deployment(self.deployment(name).id)
        assert self.deployment(name).paused is True

    def flow_run(self, run_id: UUID) -> FlowRun:
        with self.client() as client:
            return client.read_flow_run(run_id)

    def runs_of(self, deployment_id: UUID) -> list[FlowRun]:
        with self.client() as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    def wait_terminal(self, run_id: UUID, timeout: float = RUN_TIMEOUT_S, log: Path | None = None) -> FlowRun:
        def done() -> FlowRun | None:
            run = self.flow_run(run_id)
            return run if run.state_type and run.state_type.value in TERMINAL else None
        return wait_for(done, timeout, f"flow run {run_id} reaching a final state", log, every=2)


def server_env(root: Path, url: str) -> dict[str, str]:
    """The environment of every process that talks to the test server (none of the caller's PREFECT_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRAIN_MNIST_", "MLFLOW_"))}
    env.update({
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Test-speed knobs; the defaults are 60 s, 30 s, 10 s and 10 s.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "COLUMNS": "200",  # one CLI output line per fact, so the run id can be read back
    })
    return env


@contextmanager
def prefect_server(root: Path, postgres: Postgres | None = None, database: str = "prefect",
                   scheduler: bool = True) -> Iterator[Server]:
    """``prefect server start`` on a free port of 127.0.0.1: its state in ``database`` of ``postgres`` (a
    team's setup), or without one in a fresh SQLite file under ``root`` (the one-machine default).

    ``scheduler=False`` for tests that serve the deployments but test no schedule: otherwise a suite running
    across 02:00 UTC gets a real nightly run, which holds the nightly deployment's one slot for an hour."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(root, url)
    server_only = postgres.prefect_env(database) if postgres else {}  # the clients need no database
    if not scheduler:
        server_only["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
    log = root / "server.log"
    proc = spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], {**env, **server_only},
                 root, log)
    try:
        wait_for(lambda: http_ok(f"{url}/health"), SERVER_START_TIMEOUT_S,
                 f"prefect server on port {port} answering /api/health", log, proc)
        yield Server(url=url, env=env, root=root)
    finally:
        stop(proc)
