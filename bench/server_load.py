"""``python bench/run.py --server-load``: the Prefect server under many short concurrent flow runs, on SQLite and on
PostgreSQL, the same load against each in one run.

For each database: a fresh ``prefect server start`` on 127.0.0.1 (SQLite in a new file, or a new database of a
PostgreSQL cluster set up by ``deployments/team_servers.py``), a process work pool with two workers (each
running up to ``WORKER_LIMIT`` flow runs at once), and ``RUNS`` runs of ``bench/load_flow.py`` (eight mapped
tasks each) created at once by ``CREATORS`` client threads. Counted, from the clients and every log (server,
workers and the flow runs they start):
- failed API calls: calls that raised in the creating clients, plus answers a Prefect client had to retry
  (``retryable status code``) and server errors (``500``/``503`` or an ``Internal Server Error``);
- lock errors: ``database is locked`` (SQLite) or a deadlock / lock timeout (PostgreSQL);
- runs lost: runs created but not Completed by the deadline, with the states they were left in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, log
from deployments.team_servers import create_database, start_postgres
from deployments.team_servers import stop as stop_postgres
from tests.support.prefect_server import PREFECT, server_env
from tests.support.processes import free_port, http_ok, spawn, stop, wait_for

RUNS = 60
CREATORS = 6
WORKER_LIMIT = 4
DEADLINE_S = 900
POOL = "load-pool"
FAILED_CALL = re.compile(r"retryable status code|Internal Server Error|\" (500|503) |HTTPStatusError", re.I)
LOCK_ERROR = re.compile(r"database is locked|deadlock detected|lock timeout|could not obtain lock", re.I)


def run_load(database: str, work: Path) -> dict[str, Any]:
    """One database's run: server, pool, two workers, ``RUNS`` flow runs; the counts (see the module doc)."""
    root = work / database
    root.mkdir(parents=True)
    procs, postgres = [], None
    port = free_port()
    env = server_env(root, f"http://127.0.0.1:{port}/api")
    server_only: dict[str, str] = {}
    if database == "postgresql":
        cluster = Path(tempfile.mkdtemp(prefix="train-mnist-load-pg-"))
        cluster.chmod(0o711)
        postgres, pg = start_postgres(cluster, free_port(), cluster / "postgres.log")
        create_database(pg, "prefect")
        server_only = pg.prefect_env()
    try:
        procs.append(spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           {**env, **server_only}, root, root / "server.log"))
        wait_for(lambda: http_ok(f"{env['PREFECT_API_URL']}/health"), 180, f"{database} Prefect server",
                 root / "server.log", procs[0])
        deployment_id = deploy(env, root)
        for name in ("worker-a", "worker-b"):
            procs.append(spawn([PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit",
                                str(WORKER_LIMIT), "--name", name], env, root, root / f"{name}.log"))
        started = time.perf_counter()
        created, create_errors = create_runs(env["PREFECT_API_URL"], deployment_id)
        states = wait_all(env["PREFECT_API_URL"], created, DEADLINE_S)
        seconds = time.perf_counter() - started
    finally:
        for proc in reversed(procs):
            stop(proc)
        if postgres is not None:
            stop_postgres(postgres)
            shutil.rmtree(cluster, ignore_errors=True)
    logs = "\n".join(p.read_text(errors="replace") for p in root.glob("*.log"))
    lost = {state: n for state, n in Counter(states.values()).items() if state != "COMPLETED"}
    return {"database": database, "runs": RUNS, "created": len(created), "completed": Counter(states.values())["COMPLETED"],
            "failed_api_calls": len(create_errors) + len(FAILED_CALL.findall(logs)),
            "lock_errors": len(LOCK_ERROR.findall(logs)),
            "runs_lost": RUNS - Counter(states.values())["COMPLETED"], "lost_states": lost,
            "create_errors": create_errors[:5], "seconds_to_all_final": round(seconds, 1)}


def deploy(env: dict[str, str], root: Path) -> str:
    """The work pool and the load-probe deployment, created by the CLI as a team would; the deployment's id."""
    subprocess.run([PREFECT, "work-pool", "create", POOL, "--type", "process"], env=env, cwd=root, check=True,
                   capture_output=True)
    script = ("from prefect import flow; import sys; d = flow.from_source(source=sys.argv[1], "
              "entrypoint='bench/load_flow.py:load_probe').deploy(name='load', work_pool_name=sys.argv[2], "
              "print_next_steps=False); print(d)")
    done = subprocess.run([str(Path(PREFECT).with_name("python")), "-c", script, str(PROJECT_ROOT), POOL], env=env,
                          cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def create_runs(api_url: str, deployment_id: str) -> tuple[list[str], list[str]]:
    """``RUNS`` flow runs of the deployment, created by ``CREATORS`` threads at once."""
    from prefect.client.orchestration import SyncPrefectClient

    created: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def creator(count: int) -> None:
        with SyncPrefectClient(api_url) as client:
            for _ in range(count):
                try:
                    run = client.create_flow_run_from_deployment(deployment_id)
                except Exception as exc:  # noqa: BLE001 - counted, not hidden
                    with lock:
                        errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    continue
                with lock:
                    created.append(str(run.id))

    threads = [threading.Thread(target=creator, args=(RUNS // CREATORS,)) for _ in range(CREATORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return created, errors


def wait_all(api_url: str, run_ids: list[str], deadline_s: float) -> dict[str, str]:
    """Each run's state type when all are final or at the deadline, whichever comes first."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    deadline = time.monotonic() + deadline_s
    with SyncPrefectClient(api_url) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)),
                                         limit=len(run_ids) + 1)
            states = {str(r.id): r.state_type.value if r.state_type else "NONE" for r in runs}
            if all(states.get(i) in final for i in run_ids) or time.monotonic() > deadline:
                return {i: states.get(i, "MISSING") for i in run_ids}
            time.sleep(3)


def bench_server_load(work: Path) -> dict[str, Any]:
    results = {}
    for database in ("sqlite", "postgresql"):
        log(f"server load on {database}: {RUNS} flow runs, 2 workers x {WORKER_LIMIT} ...")
        results[database] = run_load(database, work)
        log(str(results[database]))
    return results
