"""``deployments/team_servers.py``: one command brings up PostgreSQL, the Prefect server and MLflow on it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deployments.team_servers import Postgres, PostgresTrouble, postgres_bin, start_postgres
from tasks.settings import PROJECT_ROOT
from tests.support.processes import clean_env, free_port, http_ok, spawn, stop, tail, wait_for

pytestmark = pytest.mark.server


@pytest.fixture
def root():
    path = Path(tempfile.mkdtemp(prefix="train-mnist-team-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def psql(pg: Postgres, database: str, query: str) -> str:
    done = subprocess.run([str(postgres_bin() / "psql"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user,
                           "-d", database, "-tAc", query], env={**os.environ, **pg.client_env()},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def start_team(root: Path, ports: dict[str, int]) -> subprocess.Popen:
    cmd = [sys.executable, str(PROJECT_ROOT / "deployments" / "team_servers.py"), "--root", str(root),
           "--postgres-port", str(ports["postgres"]), "--prefect-port", str(ports["prefect"]),
           "--mlflow-port", str(ports["mlflow"])]
    env = clean_env(PREFECT_HOME=str(root / "prefect-home"), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = spawn(cmd, env, root, root / "team.log")
    for name, url in (("prefect", f"http://127.0.0.1:{ports['prefect']}/api/health"),
                      ("mlflow", f"http://127.0.0.1:{ports['mlflow']}/health")):
        wait_for(lambda url=url: http_ok(url), 180, f"{name} server of team_servers.py", root / "team.log", proc)
    return proc


def test_one_command_starts_prefect_and_mlflow_with_their_state_in_postgres_and_ctrl_c_stops_all(root):
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient

    ports = {"postgres": free_port(), "prefect": free_port(), "mlflow": free_port()}
    proc = start_team(root, ports)
    try:
        with SyncPrefectClient(f"http://127.0.0.1:{ports['prefect']}/api") as client:
            flow_id = client.create_flow_from_name("team-servers-check")
        client_mlflow = mlflow.MlflowClient(f"http://127.0.0.1:{ports['mlflow']}")
        client_mlflow.create_experiment("team-servers-check")
        pg = Postgres("127.0.0.1", ports["postgres"], root / "pgpass")
        assert psql(pg, "prefect", f"SELECT name FROM flow WHERE id = '{flow_id}'") == "team-servers-check"
        assert psql(pg, "mlflow", "SELECT name FROM experiments WHERE name = 'team-servers-check'") == "team-servers-check"

        password = (root / "pgpass").read_text().strip().rsplit(":", 1)[1]
        assert oct((root / "pgpass").stat().st_mode & 0o777) == "0o600"
        assert password not in _every_command_line()
        assert password not in (root / "team.log").read_text(errors="replace")
        assert password not in (root / "postgres.log").read_text(errors="replace")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0, tail(root / "team.log")
    for port in ports.values():  # all three are gone
        wait_for(lambda port=port: not _listening(port), 30, f"port {port} closed after Ctrl-C")

    again = start_team(root, ports)  # a second start reuses the cluster and both databases
    try:
        pg = Postgres("127.0.0.1", ports["postgres"], root / "pgpass")
        assert psql(pg, "prefect", "SELECT count(*) FROM flow WHERE name = 'team-servers-check'") == "1"
        assert "created database" not in (root / "team.log").read_text().split("Ctrl-C stops all three")[-1]
    finally:
        os.killpg(again.pid, signal.SIGTERM)  # what a service manager sends: it must stop all three as well
        assert again.wait(timeout=120) == 0, tail(root / "team.log")
        stop(again)
    for port in ports.values():
        wait_for(lambda port=port: not _listening(port), 30, f"port {port} closed after SIGTERM")


def _every_command_line() -> str:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # that process ended meanwhile
    return "\n".join(lines)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_postgres_binaries_that_are_not_there_are_named(root, monkeypatch):
    monkeypatch.setenv("TRAIN_MNIST_PG_BIN", str(root / "nowhere"))
    with pytest.raises(PostgresTrouble, match="holds no initdb"):
        start_postgres(root, free_port(), root / "postgres.log")
    assert not (root / "postgres").exists()


def test_a_port_already_taken_is_a_clear_error_and_nothing_is_left_running(root, postgres):
    with pytest.raises(PostgresTrouble, match=f"did not start on 127.0.0.1:{postgres.port}"):
        start_postgres(root, postgres.port, root / "postgres.log")


def test_the_suites_prefect_and_mlflow_servers_keep_their_state_in_postgres(prefect_server, mlflow, postgres):
    """The fan-out, publish-lock, deployment and MLflow registry tests use these two fixtures."""
    import mlflow as mlflow_client

    with prefect_server.client() as client:
        flow_id = client.create_flow_from_name("suite-on-postgres")
    mlflow_client.MlflowClient(mlflow.url).create_experiment("suite-on-postgres")
    assert psql(postgres, "prefect", f"SELECT name FROM flow WHERE id = '{flow_id}'") == "suite-on-postgres"
    assert psql(postgres, "mlflow", "SELECT count(*) FROM experiments WHERE name = 'suite-on-postgres'") == "1"
    assert not list(prefect_server.root.rglob("*.db")), "the Prefect server wrote a SQLite database too"
