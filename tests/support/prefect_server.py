"""Start a real ``prefect server start`` on 127.0.0.1 with test-speed settings (as tests/test_deployments.py does)."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

from test_deployments import PREFECT, SERVER_START_TIMEOUT_S, Server, free_port, spawn, wait_for


def start_server(root: Path, started: list[subprocess.Popen]) -> Server:
    """A server with its own PREFECT_HOME under ``root``; its process is appended to ``started``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRAIN_MNIST_"))}
    env.update({
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "5",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "COLUMNS": "200",
    })
    log = root / "server.log"
    proc = spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, root, log)
    started.append(proc)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(healthy, SERVER_START_TIMEOUT_S, f"prefect server on port {port} answering /api/health", log, proc)
    return Server(url=url, env=env, root=root)
