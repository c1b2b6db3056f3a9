"""The closed loop, end to end, all real: a Prefect server (on PostgreSQL), ``deployments/serve_deployments.py``, an
HTTP mirror, a folder registry and ``train-mnist serve`` following it while a client sends requests without pause.

New data at the mirror is noticed by ``data-watch``, whose ``train-mnist.data.changed`` event starts a run of
the dataset through the deployment's trigger; that run publishes, and the model server swaps to the new version
at the publish event. Rows from another distribution make the server's drift score cross its threshold: one
``train-mnist.drift.detected`` event, one alert, and a triggered run.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tasks.registry.folder import read_production
from tasks.settings import BUNDLED_MIRROR, PROJECT_ROOT
from tests.support.postgres import fresh_database
from tests.support.prefect_server import Server, prefect_server
from tests.support.processes import free_port, http_ok, spawn, stop, tail, wait_for
from tests.support.slices import SLICE_ROWS, cut_slice, mnist_like_datasets, slice_pixels
from tests.support.webhook import webhook_receiver

pytestmark = [pytest.mark.slow, pytest.mark.server]

TRAIN_MNIST = str(Path(sys.executable).with_name("train-mnist"))
DATASET = "loop"
TRAIN = "mnist/mnist_train.csv.gz"
TEST = "mnist/mnist_test.csv.gz"
HOLD_S = 3


@pytest.fixture(scope="module")
def place(tmp_path_factory, http_mirror_module) -> dict:
    root = tmp_path_factory.mktemp("closed-loop")
    mirror = root / "mirror"
    cut_slice(BUNDLED_MIRROR / TRAIN, mirror / TRAIN, SLICE_ROWS["train"], keep_header=False)
    cut_slice(BUNDLED_MIRROR / TEST, mirror / TEST, SLICE_ROWS["test"], keep_header=False)
    datasets_file = root / "datasets.toml"
    datasets_file.write_text(mnist_like_datasets(DATASET) + 'recipe = { model = "mlp", epochs = 3 }\n')
    return {"root": root, "mirror": mirror, "url": http_mirror_module(mirror), "datasets_file": datasets_file,
            "registry": root / "registry"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres) -> Iterator[Server]:
    """A Prefect server of this module's own: no run of another module can look like a night in progress."""
    with prefect_server(tmp_path_factory.mktemp("loop-prefect"), postgres, fresh_database(postgres, "loop"),
                        scheduler=False) as running:
        yield running


@pytest.fixture(scope="module")
def receiver():
    with webhook_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def pipeline_env(server, place) -> dict[str, str]:
    return {**server.env, "TRAIN_MNIST_SOURCE": place["url"], "TRAIN_MNIST_REGISTRY": str(place["registry"]),
            "TRAIN_MNIST_DATASETS_FILE": str(place["datasets_file"]),
            "TRAIN_MNIST_DATA_DIR": str(place["root"] / "data")}


@pytest.fixture(scope="module")
def served(server, place, pipeline_env) -> Iterator[None]:
    log = place["root"] / "serve-deployments.log"
    proc = spawn([sys.executable, str(PROJECT_ROOT / "deployments" / "serve_deployments.py"),
                  "--trigger-debounce-minutes", "0", "--data-watch-minutes", "600"], pipeline_env, place["root"], log)
    try:
        def registered() -> bool:
            try:
                return all(server.deployment(name).last_polled for name in ("train-mnist/dataset",
                                                                            "data-watch/train-mnist"))
            except Exception:  # noqa: BLE001 - not registered yet
                return False
        wait_for(registered, 180, "serve_deployments.py registering its deployments", log, proc)
        yield
    finally:
        stop(proc)
        print(f"\n--- serve_deployments.log\n{tail(log, 30)}")


def run_deployment(server: Server, name: str, *params: str) -> str:
    """``prefect deployment run NAME --param ...`` as a user types it; the flow run's id."""
    args = [a for p in params for a in ("--param", p)]
    done = server.cli("deployment", "run", name, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


def final(server: Server, run_id: str, log: Path):
    run = server.wait_terminal(run_id, timeout=600, log=log)
    assert run.state_type.value == "COMPLETED", f"{run.name}: {run.state_name}: {run.state.message}"
    return run


@pytest.fixture(scope="module")
def first_version(server, served, place) -> str:
    """A weak first version (one epoch on 500 rows), published by a plain run of the dataset deployment."""
    final(server, run_deployment(server, "train-mnist/dataset", f"dataset={DATASET}", "epochs=1", "train_rows=500"),
          place["root"] / "serve-deployments.log")
    return production(place)


def production(place) -> str:
    return read_production(place["registry"], DATASET)


@pytest.fixture(scope="module")
def model_server(server, place, first_version, receiver) -> Iterator[str]:
    port = free_port()
    log = place["root"] / "model-server.log"
    env = {**server.env, "TRAIN_MNIST_ALERT_WEBHOOK": receiver.url}
    proc = spawn([TRAIN_MNIST, "serve", "--dataset", DATASET, "--datasets-file", str(place["datasets_file"]),
                  "--registry", str(place["registry"]), "--port", str(port), "--poll-seconds", "120",
                  "--drift-window", "300", "--drift-hold-seconds", str(HOLD_S),
                  "--sample-rate", "0.5", "--sample-dir", str(place["root"] / "samples")], env, place["root"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{url}/v2/health/ready"), 180, "train-mnist serve ready", log, proc)
        wait_for(lambda: "following train-mnist.model.published" in log.read_text(), 60,
                 "the model server following publish events", log, proc)
        yield url
    finally:
        stop(proc)
        print(f"\n--- model-server.log\n{tail(log, 30)}")


class Client:
    """Sends ``rows`` in batches of 8 without pause; counts failures and which versions answered."""

    def __init__(self, url: str, rows: np.ndarray):
        self.url, self.rows = url, rows
        self.failures: list[str] = []
        self.versions: dict[str, int] = {}
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                start = (self.sent * 8) % (len(self.rows) - 8)
                batch = self.rows[start:start + 8]
                body = {"inputs": [{"name": "pixels", "shape": list(batch.shape), "datatype": "UINT8",
                                    "data": batch.reshape(-1).tolist()}]}
                try:
                    answer = http.post(f"{self.url}/v2/models/{DATASET}/infer", json=body)
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    else:
                        version = answer.json()["model_version"]
                        self.versions[version] = self.versions.get(version, 0) + 1
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self.sent += 1


def events_named(server: Server, name: str) -> list[dict]:
    answer = httpx.post(f"{server.url}/events/filter", json={"filter": {
        "event": {"name": [name]}, "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50}, timeout=10)
    answer.raise_for_status()
    return answer.json()["events"]


def triggered_runs(server: Server, event: str) -> list:
    return [r for r in server.runs_of(server.deployment("train-mnist/dataset").id)
            if r.parameters.get("triggered_by") == event]


def counters(url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {(s.labels["version"], s.labels["code"]): s.value for s in families["train_mnist_inference_requests"].samples
            if s.name.endswith("_total") and s.labels["model"] == DATASET}


def test_metrics_count_the_requests_sent_by_status_code_and_version(place, model_server, first_version):
    rows = slice_pixels(place["mirror"] / TEST, 16)
    before = counters(model_server)
    good = {"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "UINT8", "data": rows[:2].reshape(-1).tolist()}]}
    bad = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
    with httpx.Client(timeout=30) as http:
        codes = [http.post(f"{model_server}/v2/models/{DATASET}/infer", json=good).status_code for _ in range(7)]
        codes += [http.post(f"{model_server}/v2/models/{DATASET}/infer", json=bad).status_code for _ in range(3)]
        codes += [http.post(f"{model_server}/v2/models/{DATASET}/versions/nope/infer", json=good).status_code
                  for _ in range(2)]
        codes += [http.post(f"{model_server}/v2/models/unknown/infer", json=good).status_code]
    assert codes == [200] * 7 + [400] * 3 + [404] * 3
    after = counters(model_server)
    sent = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert {k: v for k, v in sent.items() if v} == {(first_version, "200"): 7, (first_version, "400"): 3,
                                                     (first_version, "404"): 2}


def test_new_data_at_the_mirror_is_trained_published_and_served_with_no_failed_request(
        server, place, model_server, first_version):
    rows = slice_pixels(place["mirror"] / TEST)
    log = place["root"] / "serve-deployments.log"
    final(server, run_deployment(server, "data-watch/train-mnist", f"dataset={DATASET}"), log)  # first look: recorded
    assert events_named(server, "train-mnist.data.changed") == []
    with Client(model_server, rows) as client:
        wait_for(lambda: client.sent > 20, 60, "the client's first answers")
        # A new (valid) training file: other real rows, replaced atomically as a mirror sync would.
        fresh = place["mirror"] / "fresh.csv.gz"
        cut_slice(BUNDLED_MIRROR / TRAIN, fresh, SLICE_ROWS["train"], keep_header=False, skip=SLICE_ROWS["train"])
        fresh.replace(place["mirror"] / TRAIN)
        final(server, run_deployment(server, "data-watch/train-mnist", f"dataset={DATASET}"), log)
        [changed] = wait_for(lambda: events_named(server, "train-mnist.data.changed"), 60,
                             "the data.changed event on the Prefect server", log)
        assert changed["resource"]["train-mnist.dataset"] == DATASET and changed["payload"]["changed"] == ["train"]
        [run] = wait_for(lambda: triggered_runs(server, "train-mnist.data.changed"), 120,
                         "a run triggered by the data.changed event", log)
        assert run.parameters["dataset"] == DATASET
        final(server, str(run.id), log)
        second = production(place)
        assert second != first_version, "the triggered run published a new version"
        wait_for(lambda: client.versions.get(second), 120, f"the model server answering with {second}",
                 place["root"] / "model-server.log")
        time.sleep(2)
    assert client.failures == [], client.failures[:5]
    assert client.versions.get(first_version) and client.versions.get(second)
    log_text = (place["root"] / "model-server.log").read_text()
    assert f"train-mnist.model.published {second}: looking at production now" in log_text, "swapped on the event"
    published = wait_for(lambda: [e for e in events_named(server, "train-mnist.model.published")
                                  if e["resource"].get("train-mnist.version") == second], 60, "the publish event")
    assert len(published) == 1


def test_inputs_from_another_distribution_raise_one_drift_event_one_alert_and_a_triggered_run(
        server, place, model_server, receiver):
    rows = 255 - slice_pixels(place["mirror"] / TEST)  # inverted digits: the same shapes, every grey level flipped
    before, serving = len(receiver.received()), production(place)
    with Client(model_server, rows) as client:
        wait_for(lambda: events_named(server, "train-mnist.drift.detected"), 60, "a drift event",
                 place["root"] / "model-server.log")
        time.sleep(3 * HOLD_S)  # drift goes on well past the hold time: still one episode
        # (read before the triggered run can publish: a new version starts an empty window)
        scores = httpx.get(f"{model_server}/v2/models/{DATASET}", timeout=10).json()["parameters"]["drift"]["scores"]
    assert client.failures == []
    [drift] = events_named(server, "train-mnist.drift.detected")
    assert drift["resource"]["train-mnist.dataset"] == DATASET
    assert drift["resource"]["train-mnist.version"] == serving
    # The event names what lasted past the hold time. As inverted rows replace the window's earlier ones, the
    # pixel mean shifts first (33 -> 222 of 255); the mean-image distance may cross a little later, so which
    # others are named depends on timing, but 3 hold times on the window is all inverted rows.
    assert "pixel_mean_shift" in drift["payload"]["statistics"]
    alerts = receiver.received()[before:]
    assert len(alerts) == 1 and DATASET in alerts[0]["subject"] and "pixel_mean_shift" in alerts[0]["body"]
    wait_for(lambda: triggered_runs(server, "train-mnist.drift.detected"), 120, "a run triggered by the drift event")
    metadata = httpx.get(f"{model_server}/v2/models/{DATASET}", timeout=10).json()
    assert metadata["parameters"]["drift"]["episodes"] == 1
    assert scores["mean_image_rmse"]["value"] > scores["mean_image_rmse"]["threshold"], scores


def test_sampled_rows_are_kept_as_parquet_with_the_version_that_answered(place, model_server, first_version):
    import pyarrow.parquet as pq

    files = wait_for(lambda: sorted((place["root"] / "samples").glob("samples-*.parquet")), 120,
                     "the first file of sampled rows")
    table = pq.read_table(files[0])
    assert table.num_rows > 0 and {"served_at", "model", "version", "predicted", "pixel784"} <= set(table.column_names)
    assert set(table["model"].to_pylist()) == {DATASET}
    assert first_version in set(pq.read_table(files[0])["version"].to_pylist())
