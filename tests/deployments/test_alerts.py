"""Alerts end to end: a real Prefect server, ``deployments/serve_deployments.py``, ``deployments/alerts.py`` and a webhook
receiver on 127.0.0.1. A failed night sends exactly one notification naming each failed dataset, its stage, its
reason and the run; a run past the deadline sends an overdue one and, once it succeeds, nothing else."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from deployments.alerts import FAILED_AUTOMATION, OVERDUE_AUTOMATION
from tasks.registry.run_log import TREND_FILE, read_run_log
from tasks.settings import BUNDLED_MIRROR, PROJECT_ROOT
from tests.deployments.test_deployments import QUICK, trigger
from tests.support.held_mirror import held_mirror
from tests.support.prefect_server import RUN_TIMEOUT_S, prefect_server
from tests.support.processes import spawn, stop, wait_for
from tests.support.webhook import webhook_receiver

pytestmark = [pytest.mark.slow, pytest.mark.server]

NOTIFY_TIMEOUT_S = 180  # event -> triggers service -> actions service -> webhook; generous on a busy machine
QUIET_S = 20  # after the first notification (or the run's end), how long no other one may arrive
IMPOSSIBLE = {"dataset": "mnist,broken", "model": "mlp", "epochs": 1, "train_rows": 2000, "min_accuracy": 0.999}
BROKEN = """[[dataset]]
name = "broken"
class_names = ["a", "b"]
train = { path = "broken/train.csv.gz" }
test = { path = "broken/test.csv.gz" }
gates = { min_accuracy = 0.5 }
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own: its automations and notifications must see this module's runs only."""
    with prefect_server(tmp_path_factory.mktemp("prefect"), scheduler=False) as running:
        yield running


@pytest.fixture(scope="module")
def receiver() -> Iterator:
    with webhook_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def served(server, started, tmp_path_factory) -> Iterator[subprocess.Popen]:
    log = server.root / "serve.log"
    proc = spawn([sys.executable, str(PROJECT_ROOT / "deployments" / "serve_deployments.py")], server.env,
                 tmp_path_factory.mktemp("serve-cwd"), log)
    started.append(proc)
    try:
        def registered() -> bool:
            try:
                return bool(server.deployment("train-mnist/nightly").last_polled)
            except Exception:  # noqa: BLE001 - not registered yet
                return False
        wait_for(registered, 120, "serve.py registering train-mnist/nightly", log, proc)
        yield proc
    finally:
        stop(proc)


def set_up(server, receiver, *extra: str) -> str:
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "deployments" / "alerts.py"), "--webhook-url",
                             receiver.url, *extra], env=server.env, cwd=server.root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def alerts(server, receiver, served) -> None:
    out = set_up(server, receiver)
    assert FAILED_AUTOMATION in out and OVERDUE_AUTOMATION in out
    # Running the command again replaces, never duplicates (two automations would send two messages).
    set_up(server, receiver)
    with server.client() as client:
        assert len(client.read_automations_by_name(FAILED_AUTOMATION)) == 1
        assert len(client.read_automations_by_name(OVERDUE_AUTOMATION)) == 1
    time.sleep(15)  # the triggers service picks up new automations on its own schedule


def params(tmp_path, base: dict) -> dict:
    return {**base, "registry": str(tmp_path / "registry"), "data_dir": str(tmp_path.parent / "alerts-data")}


def test_a_failed_night_sends_exactly_one_notification_naming_each_dataset_its_stage_and_reason(
        server, receiver, alerts, tmp_path):
    """mnist fails its gate, ``broken`` (a datasets-file entry whose files the mirror lacks) its download. Before,
    the stage was guessed from words of the whole message (every message says "not published", any path holds
    "train") and the dataset was the parameter."""
    datasets_file = tmp_path / "datasets.toml"
    datasets_file.write_text(BROKEN)
    before = len(receiver.received())
    run_id = trigger(server, "train-mnist/nightly", {**params(tmp_path, IMPOSSIBLE), "datasets_file": str(datasets_file)})
    run = server.wait_terminal(run_id, timeout=RUN_TIMEOUT_S, log=server.root / "serve.log")
    assert run.state_type.value == "FAILED", run.state
    posts = wait_for(lambda: receiver.received()[before:], NOTIFY_TIMEOUT_S, "the failure notification",
                     server.root / "server.log")
    time.sleep(QUIET_S)
    posts = receiver.received()[before:]
    assert len(posts) == 1, f"expected one notification for the failed run, got {len(posts)}: {posts}"
    subject, body = posts[0]["subject"], posts[0]["body"]
    print(f"\nnotification:\n{subject}\n{body}")
    assert subject == "train-mnist nightly Failed: mnist, broken"
    assert f"run {run.name} ended Failed." in body
    mnist, broken = body.split("dataset: ")[1:3]
    assert mnist.startswith("mnist\nstage: gate\nreason: mnist: gate failed") and "threshold 0.9990" in mnist
    assert broken.startswith("broken\nstage: download\nreason: ") and "no such file" in broken
    assert f"/runs/flow-run/{run_id}" in body
    # The failed night is in the dataset's history too, with the stage times Prefect measured.
    [entry] = read_run_log(tmp_path / "registry", "mnist")
    assert (entry.outcome, entry.stage, entry.gate_passed) == ("gate_failed", "gate", False)
    assert {"train", "evaluate", "gate", "publish"} <= set(entry.stage_seconds) and entry.stage_seconds["train"] > 0


def test_a_run_past_the_deadline_sends_an_overdue_notification_and_nothing_else(server, receiver, alerts, tmp_path,
                                                                               catalog):
    """The run is held (its train file is served only once the alert has come), so it is overdue on any machine;
    it then succeeds, and a successful run sends no failure notification."""
    set_up(server, receiver, "--deadline-minutes", "0.25")
    time.sleep(15)  # the triggers service picks up the changed automation on its own schedule
    try:
        with held_mirror(BUNDLED_MIRROR, catalog["mnist"].train.path) as mirror:
            before = len(receiver.received())
            run_id = trigger(server, "train-mnist/nightly", {**params(tmp_path, QUICK), "source": mirror.url,
                                                             "data_dir": str(tmp_path / "data")})
            wait_for(lambda: receiver.received()[before:], NOTIFY_TIMEOUT_S, "the overdue notification",
                     server.root / "server.log")
            mirror.release()
            run = server.wait_terminal(run_id, timeout=RUN_TIMEOUT_S, log=server.root / "serve.log")
        assert run.state_type.value == "COMPLETED", run.state
        time.sleep(QUIET_S)
        posts = receiver.received()[before:]
        assert len(posts) == 1, posts
        assert posts[0]["subject"] == f"train-mnist nightly overdue: {run.name}"
        assert "more than 0.25 minutes" in posts[0]["body"] and f"/runs/flow-run/{run_id}" in posts[0]["body"]
        [entry] = read_run_log(tmp_path / "registry", "mnist")
        assert entry.outcome == "published" and entry.canary_latency_s > 0 and entry.drift["test.rows"] == 10000
        assert (tmp_path / "registry" / "mnist" / TREND_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with server.client() as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mnist-history"])))
        assert artifacts and "| version | date | outcome |" in artifacts[0].data
    finally:
        set_up(server, receiver)
