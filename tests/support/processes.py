"""Processes that tests start: own process group, output to a log, stopped with all their children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deployments.team_servers import stop_all as stop_servers


def spawn(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new process group (so it can be stopped with all its children), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it after 30 s."""
    stop_all([proc])


def stop_all(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """The team servers' own stop (SIGTERM to every process group at once, one ``grace_s`` deadline, SIGKILL to
    what still runs), then SIGKILL to each group again: children that outlived their parent go too."""
    stop_servers(procs, grace_s)
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, log: Path | None = None,
             proc: subprocess.Popen | None = None, every: float = 1.0):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` (and the log) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{tail(log) if log else ''}")
        result = condition()
        if result:
            return result
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{tail(log) if log else ''}")


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect, train-mnist or MLflow setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRAIN_MNIST_", "MLFLOW_"))}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return env
