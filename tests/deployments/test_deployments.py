"""The deployments against a real Prefect server: served from one process, and deployed to a work pool.

One server (SQLite, 127.0.0.1, a temporary PREFECT_HOME) is shared by the module. ``TestServe`` serves
``deployments/serve_deployments.py``; ``TestWorkPool`` deploys ``deployments/prefect.yaml`` from a copy of the
repository at another path and runs a process worker elsewhere. Runs are triggered exactly as a user
would, with ``prefect deployment run``, and kept short (one epoch on 5,000 MNIST rows).
Every process started here is stopped by its process group, also when a test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import RRuleSchedule
from prefect.exceptions import PrefectHTTPStatusError

from tasks.artifacts import VERSION_FILES
from tasks.registry.folder import list_versions, read_production
from tasks.settings import PROJECT_ROOT
from tests.support.prefect_server import PREFECT, RUN_TIMEOUT_S, TERMINAL, Server
from tests.support.processes import spawn, stop, tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.server]

QUICK = {"dataset": "mnist", "model": "mlp", "epochs": 1, "train_rows": 5000, "min_accuracy": 0.5,
         "min_class_recall": 0.0}


@pytest.fixture(scope="module")
def server(prefect_server) -> Server:
    return prefect_server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for every run of the module, so downloads and conversions are reused."""
    return tmp_path_factory.mktemp("data")


def trigger(server: Server, deployment: str, params: dict, *extra: str, timeout: float = 120) -> UUID:
    """``prefect deployment run`` (without waiting); the id of the flow run it created."""
    result = server.cli("deployment", "run", deployment, "--params", json.dumps(params), *extra, timeout=timeout)
    assert result.returncode == 0, f"prefect deployment run {deployment} failed:\n{result.stdout}\n{result.stderr}"
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, f"no flow run id in the output of prefect deployment run:\n{result.stdout}"
    return UUID(match.group(1))


def assert_published_once(registry: Path) -> str:
    """Exactly one complete mnist version in ``registry``, and production names it."""
    versions = list_versions(registry, "mnist")
    assert len(versions) == 1, f"expected one published mnist version in {registry}, found {versions}"
    assert read_production(registry, "mnist") == versions[0]
    missing = [name for name in VERSION_FILES if not (registry / "mnist" / versions[0] / name).is_file()]
    assert not missing, f"version {versions[0]} lacks {missing}"
    return versions[0]


def assert_rejected(server: Server, name: str, params: dict) -> None:
    """The server refuses to create a run of ``name`` with ``params``, naming the parameter."""
    deployment = server.deployment(name)
    with server.client() as client, pytest.raises(PrefectHTTPStatusError) as refused:
        client.create_flow_run_from_deployment(deployment.id, parameters=params)
    assert refused.value.response.status_code == 409
    assert f"Validation failed for field '{next(iter(params))}'" in refused.value.response.json()["detail"]


def assert_nightly_shape(deployment, parameters: dict | None = None) -> None:
    """The nightly deployment as both serve.py and prefect.yaml define it."""
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
        [("0 2 * * *", "UTC", True)]
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert deployment.parameters == (parameters or {"dataset": "all"})
    assert deployment.enforce_parameter_schema is True
    assert deployment.paused is False


# --- one process: deployments/serve_deployments.py ---------------------------------------------------------------

@pytest.fixture(scope="class")
def served(server, started, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """``python deployments/serve_deployments.py`` started from a folder outside the repository."""
    elsewhere = tmp_path_factory.mktemp("serve-cwd")
    log = server.root / "serve.log"
    proc = spawn([sys.executable, str(PROJECT_ROOT / "deployments" / "serve_deployments.py")], server.env, elsewhere, log)
    started.append(proc)
    try:
        def registered() -> bool:
            try:
                return all(server.deployment(f"train-mnist/{name}").last_polled for name in ("nightly", "smoke"))
            except Exception:  # noqa: BLE001 - not registered yet
                return False
        wait_for(registered, 120, "serve.py registering and polling train-mnist/nightly and /smoke", log, proc)
        yield proc
    finally:
        stop(proc)


@pytest.mark.usefixtures("served")
class TestServe:
    def test_nightly_is_scheduled_at_0200_utc_one_run_at_a_time(self, server):
        nightly = server.deployment("train-mnist/nightly")
        assert_nightly_shape(nightly)

        def upcoming() -> list[FlowRun]:
            return sorted((r for r in server.runs_of(nightly.id) if r.auto_scheduled and r.state_type.value == "SCHEDULED"),
                          key=lambda r: r.expected_start_time)
        runs = wait_for(upcoming, 60, "the scheduler creating the upcoming nightly runs", server.root / "server.log")
        first = runs[0].expected_start_time.astimezone(UTC)
        assert (first.hour, first.minute, first.second) == (2, 0, 0)
        assert timedelta(0) < first - datetime.now(UTC) <= timedelta(days=1)
        assert runs[0].parameters == {"dataset": "all"}
        server.pause("train-mnist/nightly")  # checked: a real 02:00 run must not start beside the tests

        smoke = server.deployment("train-mnist/smoke")
        assert smoke.schedules == []
        assert smoke.parameters["registry"] == str(PROJECT_ROOT / "data" / "smoke-registry")

    @pytest.mark.parametrize(("param", "message"), [
        ("epochs=0", r"Validation failed for field 'epochs'.*0 is less than or equal to the minimum of 0"),
        ("model=rnn", r"Validation failed for field 'model'.*'rnn' is not one of"),
        ("epoch=1", r"not found on the deployment: 'epoch'"),
    ], ids=["epochs=0", "model=rnn", "unknown-name"])
    def test_bad_parameter_is_rejected_by_deployment_run(self, server, param, message):
        nightly = server.deployment("train-mnist/nightly")
        before = {r.id for r in server.runs_of(nightly.id) if not r.auto_scheduled}
        result = server.cli("deployment", "run", "train-mnist/nightly", "--param", param)
        assert result.returncode == 1, result.stdout
        assert re.search(message, " ".join(result.stdout.split())), result.stdout
        assert {r.id for r in server.runs_of(nightly.id) if not r.auto_scheduled} == before, "a run was created"

    @pytest.mark.parametrize("params", [{"min_accuracy": 1.5}, {"min_class_recall": -0.1}, {"train_rows": 0},
                                        {"epochs": "many"}, {"dataset": ["mnist"]}], ids=json.dumps)
    def test_bad_parameter_is_rejected_by_the_api(self, server, params):
        assert_rejected(server, "train-mnist/nightly", params)

    def test_deployment_run_completes_publishes_and_a_second_run_waits(self, server, data_dir, tmp_path):
        registry = tmp_path / "registry"
        params = {**QUICK, "registry": str(registry), "data_dir": str(data_dir)}
        started_at = time.monotonic()
        first = trigger(server, "train-mnist/nightly", params)
        wait_for(lambda: server.flow_run(first).state_type.value in {"RUNNING", *TERMINAL}, RUN_TIMEOUT_S,
                 "the first nightly run starting", server.root / "serve.log", every=1)
        # Collides with the running one; it fails at its first line (unknown dataset) once it gets the slot.
        second = trigger(server, "train-mnist/nightly",
                         {"dataset": "no-such-dataset", "registry": str(registry), "data_dir": str(data_dir)})

        done = server.wait_terminal(first, log=server.root / "serve.log")
        elapsed = time.monotonic() - started_at
        assert done.state_type.value == "COMPLETED", f"{done.state}\n{tail(server.root / 'serve.log')}"
        print(f"\nprefect deployment run -> Completed (served): {elapsed:.1f} s")
        assert_published_once(registry)

        other = server.wait_terminal(second, log=server.root / "serve.log")
        assert other.state_type.value == "FAILED"
        assert "unknown dataset(s) ['no-such-dataset']; known:" in other.state.message
        with server.client() as client:
            waits = [s for s in client.read_flow_run_states(second) if s.name == "AwaitingConcurrencySlot"]
            assert client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second]))) == []
        assert waits, "the second run never waited for the concurrency slot"
        assert other.start_time >= done.end_time, "the two nightly runs overlapped"
        assert list_versions(registry, "mnist") == [read_production(registry, "mnist")]

    def test_the_operators_pin_rollback_and_unpin_run_as_deployments_and_say_what_changed(
            self, server, trained_models, tmp_path):
        """rollback/train-mnist, pin/train-mnist, unpin/train-mnist: run from the server (as the UI's form does),
        each under the lock, each posting an artifact; a refused rollback fails naming why."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        from tasks.publishing.publish import publish_version
        from tasks.registry import open_registry
        from tests.support.publish_worker import registry_candidate

        registry = tmp_path / "registry"
        first, second = (publish_version(open_registry(registry), registry_candidate(
            "mnist", trained_models["strong"])).version for _ in range(2))
        for deployment, params, production in (
                ("pin/train-mnist", {"reason": "freeze"}, second),
                ("unpin/train-mnist", {}, second),
                ("rollback/train-mnist", {"reason": "bad night"}, first)):
            run = trigger(server, deployment, {"dataset": "mnist", "registry": str(registry), **params})
            done = server.wait_terminal(run, log=server.root / "serve.log")
            assert done.state_type.value == "COMPLETED", f"{deployment}: {done.state}\n{tail(server.root / 'serve.log')}"
            assert read_production(registry, "mnist") == production
        refused = trigger(server, "rollback/train-mnist", {"dataset": "mnist", "registry": str(registry),
                                                           "to": "20250101T000000Z-gone00"})
        done = server.wait_terminal(refused, log=server.root / "serve.log")
        assert done.state_type.value == "FAILED" and "does not exist" in done.state.message
        assert read_production(registry, "mnist") == first
        with server.client() as client:
            [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mnist-rollback"])))
        assert f"production rolled back from {second} to {first}" in artifact.data

    def test_scheduler_starts_a_run_by_itself(self, server, data_dir, tmp_path):
        """A one-off schedule on the smoke deployment: the server creates the run, the served process runs it."""
        smoke = server.deployment("train-mnist/smoke")
        registry = tmp_path / "registry"
        at = (datetime.now(UTC) + timedelta(seconds=15)).replace(microsecond=0)
        once = RRuleSchedule(rrule=f"DTSTART:{at:%Y%m%dT%H%M%S}\nRRULE:FREQ=DAILY;COUNT=1", timezone="UTC")
        with server.client() as client:
            [schedule] = client.create_deployment_schedules(
                smoke.id, [(once, True)], parameters={"registry": str(registry), "data_dir": str(data_dir)})
        try:
            run = wait_for(lambda: next(iter(server.runs_of(smoke.id)), None), 60,
                           "the scheduler creating a smoke run", server.root / "server.log")
            assert run.auto_scheduled and run.expected_start_time == at
            done = server.wait_terminal(run.id, log=server.root / "serve.log")
        finally:
            # `prefect deploy` keeps schedules it did not create, so this one must go.
            with server.client() as client:
                client.delete_deployment_schedule(smoke.id, schedule.id)
        assert done.state_type.value == "COMPLETED", f"{done.state}\n{tail(server.root / 'serve.log')}"
        # Prefect's WaitForScheduledTime rounds the remaining wait to whole seconds, so a run may start
        # up to half a second before its scheduled time (seen in CI: 0.27 s early).
        assert done.start_time >= at - timedelta(seconds=1)
        assert done.parameters["train_rows"] == 5000 and done.parameters["registry"] == str(registry)
        assert_published_once(registry)


# --- work pool: deployments/prefect.yaml + a process worker -------------------------------------------

POOL = "train-mnist-pool"


@pytest.fixture(scope="class")
def clone(tmp_path_factory) -> Path:
    """The repository's code at another path, as a fresh clone would be (the data mirror stays shared)."""
    root = tmp_path_factory.mktemp("a clone") / "train-mnist"
    for part in ("flows", "tasks", "deployments"):
        shutil.copytree(PROJECT_ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="class")
def worker(server, started, clone, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """``prefect deploy --all`` from the clone's root; a process worker started in an unrelated folder."""
    created = server.cli("work-pool", "create", POOL, "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    queue = server.cli("work-queue", "create", "train", "--pool", POOL)
    assert queue.returncode == 0, queue.stdout + queue.stderr
    # PWD is what a shell sets after `cd`; prefect.yaml's pull step reads it.
    deployed = server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml",
                          cwd=clone, env={"PWD": str(clone)}, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = server.root / "worker.log"
    proc = spawn([PREFECT, "worker", "start", "--pool", POOL], server.env, tmp_path_factory.mktemp("worker-cwd"),
                 log)
    started.append(proc)
    try:
        yield proc
    finally:
        stop(proc)


@pytest.mark.usefixtures("worker")
class TestWorkPool:
    def test_yaml_deploys_nightly_and_smoke_for_the_clone(self, server, clone):
        nightly = server.deployment("train-mnist/nightly")
        assert_nightly_shape(nightly, {"dataset": "all", "fan_out": True})
        assert nightly.work_pool_name == POOL and nightly.entrypoint == "flows.train:train_mnist"
        server.pause("train-mnist/nightly")  # checked: a real 02:00 run must not start beside the tests
        assert not nightly.pull_steps  # the worker runs the train-mnist installed on its machine
        child = server.deployment("train-mnist/dataset")
        assert child.work_pool_name == POOL and child.work_queue_name == "train"
        smoke = server.deployment("train-mnist/smoke")
        assert smoke.work_pool_name == POOL and smoke.schedules == []
        assert smoke.parameters == {"dataset": "mnist", "model": "mlp", "epochs": 1, "train_rows": 5000,
                                    "min_accuracy": 0.5, "min_class_recall": 0.0,
                                    "registry": str(clone / "data" / "smoke-registry")}

    def test_bad_parameter_is_rejected(self, server):
        assert_rejected(server, "train-mnist/nightly", {"epochs": -3})
        assert_rejected(server, "train-mnist/smoke", {"model": "rnn"})

    def test_deployment_run_watch_completes_on_the_worker(self, server, data_dir, tmp_path):
        registry = tmp_path / "registry"
        params = {**QUICK, "registry": str(registry), "data_dir": str(data_dir)}
        started_at = time.monotonic()
        result = server.cli("deployment", "run", "train-mnist/nightly", "--params", json.dumps(params),
                            "--watch", "--watch-timeout", str(RUN_TIMEOUT_S), timeout=RUN_TIMEOUT_S + 60)
        elapsed = time.monotonic() - started_at
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{tail(server.root / 'worker.log')}"
        assert "Flow run finished successfully in 'Completed'" in result.stdout
        print(f"\nprefect deployment run --watch -> Completed (worker): {elapsed:.1f} s")
        run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1))
        run = server.flow_run(run_id)
        assert run.work_pool_name == POOL and run.state_type.value == "COMPLETED"
        assert_published_once(registry)
