"""A team's server host in one command: PostgreSQL, then the Prefect server and MLflow with their state in it.

    python deployments/team_servers.py --root ~/train-mnist-servers [--host 0.0.0.0]

Ctrl-C stops all three. The first start creates the database cluster and the two databases; later starts
reuse them. These are the plain commands it runs (``ROOT`` is ``--root``, ``BIN`` PostgreSQL's server
binaries, found as ``/usr/lib/postgresql/<newest>/bin``, on the PATH or in ``$TRAIN_MNIST_PG_BIN``)::

    BIN/initdb -D ROOT/postgres -U train_mnist --auth=scram-sha-256 --pwfile=<a generated password>  # first start
    BIN/postgres -D ROOT/postgres -c listen_addresses=127.0.0.1 -c port=5432 -c unix_socket_directories=
    BIN/createdb -h 127.0.0.1 -p 5432 -U train_mnist prefect                                           # first start
    BIN/createdb -h 127.0.0.1 -p 5432 -U train_mnist mlflow                                            # first start
    PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://train_mnist@127.0.0.1:5432/prefect \\
        prefect server start --host HOST --port 4200
    mlflow server --host HOST --port 5000 --backend-store-uri postgresql://train_mnist@127.0.0.1:5432/mlflow \\
        --artifacts-destination ROOT/mlflow-artifacts

PostgreSQL listens on 127.0.0.1 only: the servers are its only clients. The password is generated once and
kept in ``ROOT/pgpass`` (mode 600), which both servers read through ``PGPASSFILE``; it never appears in a
URL, a command line or a log. PostgreSQL refuses to run as root, so a root caller runs ``initdb`` and
``postgres`` as the ``postgres`` user (``ROOT`` must then be reachable by that user, e.g. not under /root).
SQLite stays the default for one machine: without this script both servers keep their state in files.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

USER = "train_mnist"
DATABASES = ("prefect", "mlflow")
READY_TIMEOUT_S = 60


class PostgresTrouble(RuntimeError):
    """PostgreSQL could not be set up or started; the message says which step and shows its output."""


@dataclass(frozen=True)
class Postgres:
    """Where the servers find PostgreSQL: host, port, user, and the passfile that holds the password."""

    host: str
    port: int
    passfile: Path
    user: str = USER

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A connection URL without the password (libpq and asyncpg read it from ``PGPASSFILE``)."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def client_env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.passfile)}

    def prefect_env(self, database: str = "prefect") -> dict[str, str]:
        """What ``prefect server start`` needs to keep its state in ``database``."""
        return {**self.client_env(), "PREFECT_API_DATABASE_CONNECTION_URL": self.url(database, "postgresql+asyncpg")}


def postgres_bin() -> Path:
    """The folder of ``initdb`` and ``postgres``: ``$TRAIN_MNIST_PG_BIN``, the newest Debian one, or the PATH."""
    if os.environ.get("TRAIN_MNIST_PG_BIN"):
        chosen = Path(os.environ["TRAIN_MNIST_PG_BIN"])
        if not (chosen / "initdb").is_file():
            raise PostgresTrouble(f"TRAIN_MNIST_PG_BIN={chosen} holds no initdb: point it at PostgreSQL's bin folder")
        return chosen
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresTrouble("PostgreSQL's server binaries (initdb, postgres) were not found: install them "
                          "(Debian: apt-get install postgresql) or set TRAIN_MNIST_PG_BIN to their folder")


def _server_user() -> dict:
    """Run PostgreSQL's server programs as ``postgres`` when we are root (they refuse to run as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError as missing:
        raise PostgresTrouble("running as root, and there is no 'postgres' user to run PostgreSQL as") from missing
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def init_cluster(root: Path) -> Postgres:
    """Create ``root/postgres`` (``initdb``, password authentication) and ``root/pgpass`` unless they exist.

    Returns a ``Postgres`` whose port is still to be chosen (see ``at_port``)."""
    root.mkdir(parents=True, exist_ok=True)
    data, passfile = root / "postgres", root / "pgpass"
    if (data / "PG_VERSION").is_file():
        if not passfile.is_file():
            raise PostgresTrouble(f"{data} exists but its password file {passfile} is gone")
        return Postgres("127.0.0.1", 0, passfile)
    initdb = postgres_bin() / "initdb"
    password = secrets.token_urlsafe(24)
    data.mkdir(mode=0o700, exist_ok=True)
    _give_to_server_user(data)
    pwfile = root / ".initdb-password"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _give_to_server_user(pwfile)
    try:
        _run([str(initdb), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
              f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"], "initdb", **_server_user())
    finally:
        pwfile.unlink(missing_ok=True)
    passfile.touch(mode=0o600)
    passfile.write_text(f"127.0.0.1:*:*:{USER}:{password}\n")  # host:port:database:user:password
    return Postgres("127.0.0.1", 0, passfile)


def start_postgres(root: Path, port: int, log: Path) -> tuple[subprocess.Popen, Postgres]:
    """Start the cluster under ``root`` on 127.0.0.1:``port`` (TCP only) and wait until it accepts connections."""
    pg = init_cluster(root)
    pg = Postgres(pg.host, port, pg.passfile)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(postgres_bin() / "postgres"), "-D", str(root / "postgres"), "-c", f"listen_addresses={pg.host}",
             "-c", f"port={port}", "-c", "unix_socket_directories=", "-c", "max_connections=200"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **_server_user())
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (_ready(root / "postgres") and _accepts_connections(pg)):  # not another server on that port
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise PostgresTrouble(f"PostgreSQL did not start on {pg.host}:{port}; its log ({log}):\n"
                                  + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    return proc, pg


def _ready(data: Path) -> bool:
    """The postmaster's status line (the last of ``postmaster.pid``) says it accepts connections."""
    try:
        return (data / "postmaster.pid").read_text().splitlines()[-1].strip() == "ready"
    except (OSError, IndexError):
        return False


def _accepts_connections(pg: Postgres) -> bool:
    ready = subprocess.run([str(postgres_bin() / "pg_isready"), "-q", "-h", pg.host, "-p", str(pg.port)],
                           capture_output=True)
    return ready.returncode == 0


def create_database(pg: Postgres, name: str) -> bool:
    """Create database ``name`` unless it exists; True when it was created."""
    psql = [str(postgres_bin() / "psql"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user, "-d", "postgres",
            "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"]
    exists = _run(psql, f"looking up database {name}", env=pg.client_env()).strip() == "1"
    if not exists:
        _run([str(postgres_bin() / "createdb"), "-h", pg.host, "-p", str(pg.port), "-U", pg.user, name],
             f"createdb {name}", env=pg.client_env())
    return not exists


def _run(cmd: list[str], step: str, env: dict[str, str] | None = None, **how) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, **how)
    if done.returncode != 0:
        raise PostgresTrouble(f"{step} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGINT (PostgreSQL's fast shutdown; the servers' Ctrl-C) to the process group, SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def stop_all(procs: list[subprocess.Popen], grace_s: float = 30) -> None:
    """SIGTERM (their graceful stop) to each server's process group at once, SIGKILL to what is left after
    ``grace_s``: stopping them one after the other could take a grace period each."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def prefect_server_command(host: str, port: int) -> list[str]:
    return [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", host, "--port", str(port)]


def mlflow_server_command(pg: Postgres, artifacts: Path, host: str, port: int, database: str = "mlflow") -> list[str]:
    return [str(Path(sys.executable).with_name("mlflow")), "server", "--host", host, "--port", str(port),
            "--backend-store-uri", pg.url(database), "--artifacts-destination", str(artifacts)]


def _stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder for the database cluster and artifacts")
    parser.add_argument("--host", default="127.0.0.1", help="address the Prefect and MLflow servers listen on")
    parser.add_argument("--postgres-port", type=int, default=5432)
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    root = args.root.expanduser().resolve()
    # Ctrl-C, and a service manager's stop, must stop all three. Set both explicitly: a process started in the
    # background of a non-interactive shell inherits SIGINT ignored, and Python then installs no handler for it.
    for stopping in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stopping, _stop_like_ctrl_c)
    try:
        postgres, pg = start_postgres(root, args.postgres_port, root / "postgres.log")
    except PostgresTrouble as trouble:
        print(f"error: {trouble}", file=sys.stderr)
        return 1
    procs = [postgres]
    try:
        for name in DATABASES:
            if create_database(pg, name):
                print(f"created database {name}", flush=True)
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        procs.append(subprocess.Popen(prefect_server_command(args.host, args.prefect_port),
                                      env={**env, **pg.prefect_env()}, start_new_session=True))
        procs.append(subprocess.Popen(mlflow_server_command(pg, root / "mlflow-artifacts", args.host, args.mlflow_port),
                                      env={**env, **pg.client_env()}, start_new_session=True))
        print(f"PostgreSQL on {pg.host}:{pg.port}, Prefect on http://{args.host}:{args.prefect_port}, "
              f"MLflow on http://{args.host}:{args.mlflow_port}; Ctrl-C stops all three", flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(1)
        return 1  # one of them ended on its own: its output above says why
    except KeyboardInterrupt:
        return 0
    except PostgresTrouble as trouble:
        print(f"error: {trouble}", file=sys.stderr)
        return 1
    finally:
        for stopping in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(stopping, signal.SIG_IGN)
        stop_all(procs[1:])  # the Prefect and MLflow servers at once, then the database they were using
        stop(postgres)


if __name__ == "__main__":
    sys.exit(main())
