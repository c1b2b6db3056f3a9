"""``train-mnist serve`` as a real process under hostile and careless clients, and with a registry in trouble.

Each case was seen on the landed server (issue 27): a body read whole before its 413, slow clients held
forever, a refused version never tried again, a server that died when its registry was down, 500s for
malformed requests, values that are not UINT8 pixels accepted, absolute paths in the metadata.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tasks.publishing.canary import CANARY_FILE
from tasks.publishing.publish import publish_version
from tasks.registry import open_registry
from tasks.registry.folder import set_production
from tasks.serving.protocol import max_body_bytes
from tests.support.processes import free_port, spawn, stop, tail, wait_for
from tests.support.publish_worker import registry_candidate
from tests.support.slices import mnist_like_datasets

pytestmark = [pytest.mark.slow, pytest.mark.server]

TRAIN_MNIST = str(Path(sys.executable).with_name("train-mnist"))
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DATASETS_TOML = (mnist_like_datasets("served", "served-back", class_names=tuple(NAMES))
                 + mnist_like_datasets("nine-names", class_names=tuple(NAMES[:9])))
HEADER_TIMEOUT_S = 4
MAX_BATCH = 1024


def serve(root: Path, registry: str, dataset: str, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port, log = free_port(), root / f"serve-{dataset}-{time.monotonic_ns()}.log"
    proc = spawn([TRAIN_MNIST, "serve", "--dataset", dataset, "--registry", registry, "--datasets-file",
                  str(root / "datasets.toml"), "--port", str(port), "--poll-seconds", "1", *extra], None, root, log)
    return proc, f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module")
def place(trained_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    (root / "datasets.toml").write_text(DATASETS_TOML)
    registry = root / "registry"
    published = {name: publish_version(open_registry(registry), registry_candidate(name, trained_models["strong"]))
                 for name in ("served", "nine-names")}
    return {"root": root, "registry": registry, "version": published["served"].version}


@pytest.fixture(scope="module")
def server(place) -> Iterator[dict]:
    proc, url, log = serve(place["root"], str(place["registry"]), "served", "--header-timeout",
                           str(HEADER_TIMEOUT_S), "--body-timeout", str(HEADER_TIMEOUT_S))
    try:
        wait_for(lambda: ok(f"{url}/v2/health/ready"), 180, "train-mnist serve ready", log, proc)
        yield {"url": url, "proc": proc, "log": log, "port": int(url.rsplit(":", 1)[1])}
    finally:
        stop(proc)
        print(f"\n--- serve.log\n{tail(log, 15)}")
    # Whatever was thrown at it, the server never answered 500 nor logged a traceback.
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and " 500" not in text, tail(log, 60)


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_request(port: int, head: str, body: bytes = b"", read_s: float = 10.0) -> tuple[bytes, float]:
    """Send ``head`` (and ``body``) on a plain socket; (the whole answer, seconds until it was in)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as sock:
        started = time.monotonic()
        sock.sendall(head.encode() + body)
        return read_answer(sock), time.monotonic() - started


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer, read whole: its head, then as many bytes as its Content-Length says (or to the close)."""
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while (length is None or len(body) < length) and (chunk := sock.recv(65536)):
        body += chunk
    return head + b"\r\n\r\n" + body


def infer(rows: int, datatype: str = "UINT8", data=None) -> dict:
    return {"inputs": [{"name": "pixels", "shape": [rows, 784], "datatype": datatype,
                        "data": data if data is not None else [0] * (784 * rows)}]}


# ---- 1. limits --------------------------------------------------------------------------------------------


def test_a_300_mb_body_is_refused_from_its_length_in_under_a_second_without_growing_the_server(server):
    before = rss_kib(server["proc"].pid)
    head = ("POST /v2/models/served/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 * 2**20}\r\n\r\n")
    answer, seconds = raw_request(server["port"], head, b'{"inputs": [' + b"0, " * 100_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert seconds < 1.0 and b'"error"' in answer and b"over the limit" in answer
    assert rss_kib(server["proc"].pid) - before < 100 * 1024


def test_a_chunked_body_is_cut_off_at_the_limit_as_it_streams_in(server):
    before = rss_kib(server["proc"].pid)
    chunk = b"0, " * 300_000
    head = "POST /v2/models/served/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=20) as sock:
        sock.sendall(head.encode())
        sent, answer = 0, b""
        sock.settimeout(0.05)
        while sent < 300 * 2**20 and not answer:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(10)
        answer = answer or sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]  # the status line is enough here
    assert sent <= max_body_bytes(MAX_BATCH) + 4 * len(chunk)  # it stopped reading near the limit
    assert rss_kib(server["proc"].pid) - before < 100 * 1024


def test_400_slow_clients_never_stop_health_checks_and_are_closed_at_the_header_timeout(server):
    slow = []
    for _ in range(400):
        sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=5)
        sock.sendall(b"P")
        slow.append(sock)
    try:
        answered = []
        for i in range(1, 8):  # each slow client sends one more byte of its head now and then
            for sock in slow:
                try:
                    sock.sendall(b"POST /v2/models/served/infer HTTP/1.1\r\n"[i:i + 1])
                except OSError:
                    pass
            started = time.monotonic()
            status = httpx.get(f"{server['url']}/v2/health/ready", timeout=5).status_code
            answered.append((status, time.monotonic() - started))
            time.sleep(0.5)
        assert all(status == 200 and seconds < 1.0 for status, seconds in answered), answered
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 20
        open_ones = list(slow)
        while open_ones and time.monotonic() < deadline:
            still = []
            for sock in open_ones:
                sock.settimeout(0.01)
                try:
                    if sock.recv(1024) == b"":
                        continue  # closed by the server
                    still.append(sock)
                except TimeoutError:
                    still.append(sock)
                except OSError:
                    continue
            open_ones = still
            time.sleep(0.5)
        assert open_ones == [], f"{len(open_ones)} slow connections still open {HEADER_TIMEOUT_S + 20} s later"
    finally:
        for sock in slow:
            sock.close()


def test_health_answers_within_a_second_while_full_batches_are_parsed(server):
    body = json.dumps(infer(MAX_BATCH, data=np.random.default_rng(0).integers(0, 256, MAX_BATCH * 784).tolist()))
    stop_sending = threading.Event()
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop_sending.is_set():
                statuses.append(client.post(f"{server['url']}/v2/models/served/infer", content=body).status_code)

    senders = [threading.Thread(target=send, daemon=True) for _ in range(2)]
    for thread in senders:
        thread.start()
    try:
        wait_for(lambda: statuses, 60, "a first full batch answered")
        seconds = []
        for _ in range(15):
            started = time.monotonic()
            assert httpx.get(f"{server['url']}/v2/health/ready", timeout=5).status_code == 200
            seconds.append(time.monotonic() - started)
            time.sleep(0.2)
    finally:
        stop_sending.set()
        for thread in senders:
            thread.join(60)
    # Health queued behind the parsing would wait on every probe (the senders never pause); one slow probe is the
    # machine's scheduling (1.47 s once, with CI on 2 cores beside a training job), so the median is held to 1 s.
    assert statistics.median(seconds) < 1.0, seconds
    assert set(statuses) == {200}


# ---- 4, 5. malformed requests and values that are not UINT8 pixels ------------------------------------------


NOT_PIXELS = {
    "a numeric string": (infer(1, data=["12"] + [0] * 783), 'row 1, pixel 1 is "12"'),
    "a boolean": (infer(1, data=[0] * 5 + [True] + [0] * 778), "row 1, pixel 6 is true"),
    "a float": (infer(1, data=[0] * 783 + [12.0]), "row 1, pixel 784 is 12.0"),
    "INT8 with a fraction": (infer(1, "INT8", [0] * 10 + [1.5] + [0] * 773), "row 1, pixel 11 is 1.5"),
    "FP32 declared": (infer(1, "FP32"), "datatype 'FP32' is not accepted"),
    "INT16 out of range": (infer(1, "INT16", [300] + [0] * 783), "row 1, pixel 1 is 300"),
    "a huge integer": (infer(1, "INT64", [2**70] + [0] * 783), "row 1, pixel 1 is 1180591620717411303424"),
    "nested rows of the wrong length": (infer(2, data=[[0] * 783, [0] * 785]), "row 1 has 783 values"),
}


@pytest.mark.parametrize("case", list(NOT_PIXELS))
def test_values_that_are_not_uint8_pixels_are_refused_naming_input_position_and_value(server, case):
    body, said = NOT_PIXELS[case]
    answer = httpx.post(f"{server['url']}/v2/models/served/infer", json=body)
    assert answer.status_code == 400, answer.text
    assert said in answer.json()["error"] and "input pixels" in answer.json()["error"]


def test_integer_datatypes_holding_pixels_and_nested_rows_are_accepted(server):
    rows = np.random.default_rng(1).integers(0, 256, (2, 784))
    flat = httpx.post(f"{server['url']}/v2/models/served/infer", json=infer(2, "UINT8", rows.reshape(-1).tolist()))
    for datatype in ("INT32", "UINT16", "INT64"):
        answer = httpx.post(f"{server['url']}/v2/models/served/infer", json=infer(2, datatype, rows.tolist()))
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"] == flat.json()["outputs"]


def test_deep_nesting_unknown_paths_and_wrong_methods_are_4xx_with_an_error_body(server):
    deep = httpx.post(f"{server['url']}/v2/models/served/infer", content=b"[" * 200_000 + b"]" * 200_000)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    for answer in (httpx.get(f"{server['url']}/v3/nothing"), httpx.get(f"{server['url']}/v2/models/served/infer"),
                   httpx.post(f"{server['url']}/v2/models/nope/infer", json=infer(1))):
        assert 400 <= answer.status_code < 500 and answer.json()["error"], answer.text


def test_a_client_that_disconnects_mid_request_costs_one_debug_line_not_a_traceback(server):
    head = ("POST /v2/models/served/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=5) as sock:
        sock.sendall(head.encode() + b'{"inputs": [{"name": "pixels", ')
    time.sleep(1)
    assert ok(f"{server['url']}/v2/health/ready")
    assert "Traceback" not in server["log"].read_text(errors="replace")


def test_gzip_bodies_are_read_and_bombs_are_cut_off_at_the_limit(server):
    import gzip

    plain = json.dumps(infer(2)).encode()
    answer = httpx.post(f"{server['url']}/v2/models/served/infer", content=gzip.compress(plain),
                        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    bomb = gzip.compress(b" " * (max_body_bytes(MAX_BATCH) + 1_000_000))
    answer = httpx.post(f"{server['url']}/v2/models/served/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 413 and "once decompressed" in answer.json()["error"]
    answer = httpx.post(f"{server['url']}/v2/models/served/infer", content=plain, headers={"Content-Encoding": "br"})
    assert answer.status_code == 415


# ---- 6. no path of this machine in what the server shows -------------------------------------------------


def test_metadata_shows_locations_inside_the_registry_not_on_this_machine(server, place):
    text = httpx.get(f"{server['url']}/v2/models/served").text
    assert str(place["root"]) not in text and str(place["registry"]) not in text
    meta = json.loads(text)["parameters"]
    assert meta["source"] == f"served/{place['version']}/model.keras" and meta["registry"] == "folder"


# ---- 2. a refused version heals --------------------------------------------------------------------------


def test_a_refused_version_is_retried_and_served_once_its_cause_goes_away(server, place):
    registry = place["registry"] / "served"
    later = "29990101T000000Z-cafe00"
    shutil.copytree(registry / place["version"], registry / later)
    (registry / later / CANARY_FILE).rename(place["root"] / "canary-held-back.npz")  # not readable yet
    set_production(place["registry"], "served", later)
    meta = wait_for(lambda: (m := httpx.get(f"{server['url']}/v2/models/served").json())["parameters"]["last_refusal"]
                    and m, 60, "the version without its canary batch refused", server["log"])
    refusal = meta["parameters"]["last_refusal"]
    assert refusal["version"] == later and "no canary batch" in refusal["reason"] and refusal["next_try_at"]
    assert str(place["root"]) not in json.dumps(refusal)
    assert meta["parameters"]["version"] == place["version"]  # the old one still serves
    shutil.copy(place["root"] / "canary-held-back.npz", registry / later / CANARY_FILE)
    wait_for(lambda: httpx.get(f"{server['url']}/v2/models/served").json()["parameters"]["version"] == later, 90,
             "the healed version served without a restart", server["log"])
    assert "is not served (try 1" in server["log"].read_text()
    set_production(place["registry"], "served", place["version"])
    wait_for(lambda: httpx.get(f"{server['url']}/v2/models/served").json()["parameters"]["version"] == place["version"],
             60, "back on the first version", server["log"])


def test_a_version_with_more_classes_than_the_dataset_names_is_refused_not_a_500(place):
    proc, url, log = serve(place["root"], str(place["registry"]), "nine-names")
    try:
        wait_for(lambda: ok(f"{url}/v2/health/live"), 120, "live", log, proc)
        meta = wait_for(lambda: (m := httpx.get(f"{url}/v2/models/nine-names").json())["parameters"]["last_refusal"]
                        and m, 60, "the ten-class version refused", log, proc)
        assert "answers with 10 classes, but nine-names has 9" in meta["parameters"]["last_refusal"]["reason"]
        answer = httpx.post(f"{url}/v2/models/nine-names/infer", json=infer(1))
        assert answer.status_code == 503 and "10 classes" in answer.json()["error"]
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text(errors="replace")


# ---- 3. registry trouble at start --------------------------------------------------------------------------


def test_a_missing_folder_registry_is_waited_for_with_live_up_and_ready_naming_why(place, tmp_path):
    later = tmp_path / "registry-not-yet"
    proc, url, log = serve(place["root"], str(later), "served")
    try:
        wait_for(lambda: ok(f"{url}/v2/health/live"), 60, "live", log, proc)
        ready = httpx.get(f"{url}/v2/health/ready")
        assert ready.status_code == 503 and "no production version in the folder registry" in ready.json()["error"]
        shutil.copytree(place["registry"], later)
        wait_for(lambda: ok(f"{url}/v2/health/ready"), 90, "ready once the registry has a version", log, proc)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "(try 1; next try at" in text


class Forwarder:
    """A TCP port that refuses connections until ``open_to`` makes it forward them to another port."""

    def __init__(self, port: int):
        self.port, self.target, self.sock = port, None, None
        self.stopped = threading.Event()

    def open_to(self, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.5)
        while not self.stopped.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, dest):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        if self.sock:
            self.sock.close()


def test_with_mlflow_down_the_server_is_live_at_once_and_serves_when_mlflow_is_back(mlflow, trained_models, place):
    registry = open_registry(mlflow.url)
    publish_version(registry, registry_candidate("served-back", trained_models["strong"], "v-back"))
    forwarder = Forwarder(free_port())
    down = f"http://127.0.0.1:{forwarder.port}"
    proc, url, log = serve(place["root"], down, "served-back")
    try:
        started = time.monotonic()
        wait_for(lambda: ok(f"{url}/v2/health/live"), 60, "live with MLflow down", log, proc, every=0.2)
        ready = wait_for(lambda: (r := httpx.get(f"{url}/v2/health/ready")).status_code == 503
                         and "cannot read the production version" in r.json()["error"] and r, 30, "ready 503", log, proc)
        assert down in ready.json()["error"] and time.monotonic() - started < 60
        forwarder.open_to(int(mlflow.url.rsplit(":", 1)[1]))  # MLflow is back
        wait_for(lambda: ok(f"{url}/v2/health/ready"), 120, "serving once MLflow is back", log, proc)
    finally:
        stop(proc)
        forwarder.close()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    failed_tries = [line for line in text.splitlines() if "cannot read the production version" in line]
    assert failed_tries and all("next try at" in line for line in failed_tries)


# ---- 13. the protocol, as a real Open Inference Protocol client uses it -----------------------------------


def test_a_triton_client_reaches_every_call_in_json_and_binary_and_agrees_with_the_model(server, place):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from tasks.model_io import load_model

    version = place["version"]
    client = triton.InferenceServerClient(url=server["url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "train-mnist" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    assert client.is_model_ready("served") and client.is_model_ready("served", model_version=version)
    assert not client.is_model_ready("served", model_version="19990101T000000Z-000000")
    for asked in ("", version):
        assert client.get_model_metadata("served", model_version=asked)["versions"] == [version]
    with pytest.raises(InferenceServerException, match=f"the version served now is {version}"):
        client.get_model_metadata("served", model_version="19990101T000000Z-000000")
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.get_model_metadata("nope")

    rows = np.random.default_rng(2).integers(0, 256, (5, 784)).astype(np.uint8)
    expected = load_model(place["registry"] / "served" / version / "model.keras").predict(rows.astype(np.float32),
                                                                                          verbose=0)
    answers = []
    for binary, compression in ((False, None), (True, None), (True, "gzip"), (False, "gzip")):
        pixels = triton.InferInput("pixels", [5, 784], "UINT8")
        pixels.set_data_from_numpy(rows, binary_data=binary)
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "class", "label")]
        answers.append(client.infer("served", [pixels], outputs=outputs, model_version=version,
                                    request_compression_algorithm=compression))
    pixels = triton.InferInput("pixels", [5, 784], "UINT8")
    pixels.set_data_from_numpy(rows)
    answers.append(client.infer("served", [pixels]))  # no outputs named: the client asks for all, in binary
    for answer in answers:
        assert np.allclose(answer.as_numpy("probabilities"), expected, atol=1e-5)
        assert answer.as_numpy("class").tolist() == expected.argmax(axis=1).tolist()
        labels = [v.decode() if isinstance(v, bytes) else v for v in answer.as_numpy("label").tolist()]
        assert labels == [NAMES[i] for i in expected.argmax(axis=1)]
        assert answer.get_response()["model_version"] == version
    bad = triton.InferInput("pixels", [1, 784], "UINT8")
    bad.set_data_from_numpy(np.full((1, 784), 7, np.uint8), binary_data=True)
    with pytest.raises(InferenceServerException, match="not served here"):
        client.infer("served", [bad], model_version="19990101T000000Z-000000")
