"""A real Prefect server for tests: ``prefect server start`` on 127.0.0.1, a free port, a temporary home.

Processes are started in their own process group and stopped with it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PREFECT = str(Path(sys.executable).with_name("prefect"))
SERVER_START_TIMEOUT_S = 120


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect or train-mnist setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRAIN_MNIST_"))}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=10)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def wait_for(condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail(log) if log else ''}")
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail(log) if log else ''}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class PrefectServer:
    url: str  # the API URL, .../api
    env: dict[str, str]  # an environment whose Prefect commands talk to this server
    proc: subprocess.Popen
    log: Path


def start_server(root: Path) -> PrefectServer:
    """Start ``prefect server start`` with its home under ``root``; returns once /api/health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = clean_env(PREFECT_HOME=str(root / "home"), PREFECT_API_URL=url)
    log = root / "server.log"
    proc = spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, root, log)
    try:
        wait_for(lambda: answers(f"{url}/health"), SERVER_START_TIMEOUT_S, f"prefect server on port {port}", proc,
                 log)
    except BaseException:
        stop(proc)
        raise
    return PrefectServer(url, env, proc, log)
