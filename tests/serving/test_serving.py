"""``train-mnist serve`` as a real process: the Open Inference Protocol, requests checked like training rows, and
a new champion picked up while a client sends requests without pause (and a damaged one refused)."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from flows.train import train_mnist
from tasks.conversion.parquet import load_xy
from tasks.model_io import load_model
from tasks.registry.folder import read_production, set_production
from tests.support.processes import free_port, spawn, stop, tail, wait_for
from tests.support.slices import mnist_like_datasets

pytestmark = [pytest.mark.slow, pytest.mark.server]

TRAIN_MNIST = str(Path(sys.executable).with_name("train-mnist"))
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RUN = {"model": "mlp", "epochs": 2, "train_rows": 2000, "dataset": "served"}
MAX_BATCH = 16


@pytest.fixture(scope="module")
def place(prefect_api, slice_mirror, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    datasets_file = root / "datasets.toml"
    datasets_file.write_text(mnist_like_datasets("served", class_names=NAMES))
    return {"root": root, "registry": root / "registry", "datasets_file": datasets_file, "mirror": slice_mirror}


def publish_by_the_flow(place: dict[str, Path]) -> str:
    """A real nightly-style run of the flow on the slices; the version it published."""
    state = train_mnist(source=str(place["mirror"]), datasets_file=str(place["datasets_file"]),
                        registry=str(place["registry"]), data_dir=str(place["root"] / "data"), return_state=True, **RUN)
    assert state.is_completed(), state.message
    return state.result()["served"]


@pytest.fixture(scope="module")
def first_version(place) -> str:
    return publish_by_the_flow(place)


@pytest.fixture(scope="module")
def server(place, first_version) -> Iterator[str]:
    port = free_port()
    log = place["root"] / "serve.log"
    proc = spawn([TRAIN_MNIST, "serve", "--dataset", "served", "--registry", str(place["registry"]), "--datasets-file",
                  str(place["datasets_file"]), "--port", str(port), "--poll-seconds", "1", "--max-batch",
                  str(MAX_BATCH)], None, place["root"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(f"{url}/v2/health/ready"), 180, "train-mnist serve ready", log, proc)
        yield url
    finally:
        stop(proc)
        print(f"\n--- serve.log\n{tail(log, 15)}")


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def rows(slice_mirror, place, first_version) -> np.ndarray:
    pixels, _ = load_xy(next((place["root"] / "data" / "parquet" / "served").glob("test-*.parquet")))
    return pixels[:8]


def infer_body(rows: np.ndarray, datatype: str = "UINT8") -> dict:
    return {"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": datatype,
                        "data": rows.reshape(-1).tolist()}]}


def test_health_and_metadata_name_the_version_serving(server, first_version, place):
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{server}/v2/models/served").json()
    assert meta["versions"] == [first_version] and meta["parameters"]["version"] == first_version
    assert meta["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 784]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "class", "label"}
    assert meta["parameters"]["registry"] == "folder" and meta["parameters"]["last_refusal"] is None
    assert meta["parameters"]["source"] == f"served/{first_version}/model.keras"  # inside the registry, not the disk
    assert str(place["root"]) not in httpx.get(f"{server}/v2/models/served").text
    assert httpx.get(f"{server}/v2/models/nope").status_code == 404


def test_infer_answers_probabilities_and_class_names_from_the_production_model(server, first_version, place, rows):
    answer = httpx.post(f"{server}/v2/models/served/infer", json={**infer_body(rows), "id": "r-1"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == first_version and body["id"] == "r-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    model = load_model(place["registry"] / "served" / first_version / "model.keras")
    expected = model.predict(rows.astype(np.float32), verbose=0)
    assert probabilities.shape == (8, 10) and np.allclose(probabilities, expected, atol=1e-5)
    assert outputs["class"]["data"] == expected.argmax(axis=1).tolist()
    assert outputs["label"]["data"] == [NAMES[i] for i in expected.argmax(axis=1)]


BAD = {
    "malformed JSON": (b'{"inputs": [', 400, "malformed JSON"),
    "no inputs": ({"rows": []}, 400, 'list "inputs"'),
    "wrong input name": ({"inputs": [{"name": "image", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]},
                         400, 'one input named "pixels"'),
    "wrong shape": ({"inputs": [{"name": "pixels", "shape": [1, 783], "datatype": "UINT8", "data": [0] * 783}]},
                    400, "expected [rows >= 1, 784]"),
    "data and shape disagree": ({"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "UINT8",
                                             "data": [0] * 784}]}, 400, "784 values for shape [2, 784]"),
    "pixel above 255": ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "INT32",
                                     "data": [0] * 100 + [256] + [0] * 683}]}, 400, "row 1, pixel 101 is 256;"),
    "negative pixel": ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "INT32",
                                    "data": [-1] + [0] * 783}]}, 400, "pixel 1 is -1;"),
    "fractional pixel": ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32",
                                      "data": [0.5] * 784}]}, 400, "datatype 'FP32' is not accepted"),
    "not numbers": ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                 "data": ["a"] * 784}]}, 400, 'row 1, pixel 1 is "a"; pixels are JSON integers'),
    "wrong datatype": ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "BOOL", "data": [0] * 784}]},
                       400, "datatype 'BOOL'"),
    "batch over the limit": ({"inputs": [{"name": "pixels", "shape": [MAX_BATCH + 1, 784], "datatype": "UINT8",
                                          "data": [0] * 784 * (MAX_BATCH + 1)}]}, 413, f"limit of {MAX_BATCH}"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_4xx_naming_the_problem_never_a_prediction(server, case):
    body, status, said = BAD[case]
    answer = (httpx.post(f"{server}/v2/models/served/infer", content=body) if isinstance(body, bytes)
              else httpx.post(f"{server}/v2/models/served/infer", json=body))
    assert answer.status_code == status, answer.text
    assert said in answer.json()["error"] and "outputs" not in answer.json()


class Client:
    """Sends one-row requests without pause from a thread; records (status, version) of each answer."""

    def __init__(self, url: str, rows: np.ndarray):
        self.url, self.body = f"{url}/v2/models/served/infer", infer_body(rows[:1])
        self.seen: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(self.url, json=self.body)
                    version = answer.json().get("model_version") if answer.status_code == 200 else None
                    self.seen.append((answer.status_code, version))
                except httpx.HTTPError as exc:
                    self.seen.append((0, f"{type(exc).__name__}: {exc}"))

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def versions_after(self, start: int) -> list[str | None]:
        return [v for _, v in self.seen[start:]]


def test_a_new_champion_is_swapped_in_without_a_failed_request_and_a_damaged_one_is_refused(
        server, place, first_version, rows):
    with Client(server, rows) as client:
        wait_for(lambda: len(client.seen) >= 5, 60, "the client's first answers")
        second = publish_by_the_flow(place)  # a real run of the flow publishes a new version meanwhile
        assert read_production(place["registry"], "served") == second != first_version
        wait_for(lambda: client.seen and client.seen[-1][1] == second, 120, f"answers from {second}")
        swapped = len(client.seen)
        # A damaged version: production moves to a copy of the second whose model file is not a model.
        damaged = "29990101T000000Z-broken"
        shutil.copytree(place["registry"] / "served" / second, place["registry"] / "served" / damaged)
        (place["registry"] / "served" / damaged / "model.keras").write_bytes(b"PK\x03\x04 not a keras archive")
        set_production(place["registry"], "served", damaged)
        wait_for(lambda: httpx.get(f"{server}/v2/models/served").json()["parameters"]["last_refusal"], 60,
                 "the damaged version refused")
        refused_at = len(client.seen)
        time.sleep(2)
    statuses = {status for status, _ in client.seen}
    versions = [v for _, v in client.seen]
    print(f"\nswap: {len(client.seen)} requests, {versions.count(first_version)} answered by {first_version}, "
          f"{versions.count(second)} by {second}; statuses {sorted(statuses)}")
    assert statuses == {200}, [s for s in client.seen if s[0] != 200][:5]
    assert set(versions) == {first_version, second}
    first_new = versions.index(second)
    assert set(versions[first_new:]) == {second}, "an answer from the old version came after the new one's"
    assert set(client.versions_after(swapped)) == {second} and len(client.seen) > refused_at
    meta = httpx.get(f"{server}/v2/models/served").json()
    assert meta["parameters"]["version"] == second
    assert meta["parameters"]["last_refusal"]["version"] == damaged


def test_the_server_follows_an_mlflow_alias(mlflow, trained_models, tmp_path):
    """Against a real ``mlflow server``: the version the ``production`` alias names answers, then the next one."""
    from tasks.publishing.publish import publish_version
    from tasks.registry import open_registry
    from tests.support.publish_worker import registry_candidate

    datasets_file = tmp_path / "datasets.toml"
    datasets_file.write_text(mnist_like_datasets("served-mlflow", class_names=NAMES))
    registry = open_registry(mlflow.url)
    publish_version(registry, registry_candidate("served-mlflow", trained_models["strong"], "v-one"))
    port, log = free_port(), tmp_path / "serve.log"
    proc = spawn([TRAIN_MNIST, "serve", "--dataset", "served-mlflow", "--registry", mlflow.url, "--datasets-file",
                  str(datasets_file), "--port", str(port), "--poll-seconds", "1"], None, tmp_path, log)
    url = f"http://127.0.0.1:{port}"
    body = infer_body(np.zeros((2, 784), np.uint8))
    try:
        wait_for(lambda: _ok(f"{url}/v2/health/ready"), 180, "train-mnist serve ready", log, proc)
        first = httpx.post(f"{url}/v2/models/served-mlflow/infer", json=body).json()["model_version"]
        publish_version(registry, registry_candidate("served-mlflow", trained_models["strong"], "v-two"))
        second = registry.production("served-mlflow")
        wait_for(lambda: httpx.post(f"{url}/v2/models/served-mlflow/infer", json=body).json()["model_version"] == second,
                 120, f"answers from MLflow version {second}", log, proc)
        meta = httpx.get(f"{url}/v2/models/served-mlflow").json()
    finally:
        stop(proc)
    assert (first, second) == ("1", "2")
    assert meta["parameters"]["source"] == "models:/served-mlflow/2" and meta["parameters"]["registry"] == mlflow.url
