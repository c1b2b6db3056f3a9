"""``python bench/run.py --serving``: ``train-mnist serve`` against ``mlflow models serve``, same model, same load.

In one run on one machine: a real ``mlflow server`` (SQLite, 127.0.0.1) gets mnist's production model from a
short flow run (the nightly recipe's architecture, cnn-bn; its weights do not matter for speed); both servers
serve that model (``mlflow models serve -m models:/mnist@production --env-manager local``), and a fixed pool
of client threads sends requests without pause to each in turn, at batch sizes 1 and 256. Recorded per server
and batch size: requests/s, rows/s, p50 and p99 latency; then the ratios (train-mnist / MLflow). Last, a
second flow run moves the alias, and the time from the move to the first answer of the new version is taken.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import log
from tests.support.processes import free_port, spawn, stop, wait_for

CLIENTS = 4  # concurrent connections, each sending its next request as soon as the last one is answered
SECONDS = 20.0  # per server and batch size
BATCHES = (1, 256)
SHORT_RUN = {"dataset": "mnist", "model": "cnn-bn", "epochs": 1, "train_rows": 5000, "min_accuracy": 0.0,
             "min_class_recall": 0.0, "promotion_tolerance": 1.0}


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else float("nan")


def load(send: Callable[[Any], None], rows: int, seconds: float = SECONDS, clients: int = CLIENTS) -> dict[str, Any]:
    """``clients`` threads calling ``send`` back to back for ``seconds``; throughput and latency."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    send(http)
                except Exception as exc:  # noqa: BLE001 - counted, not hidden
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"requests": len(latencies), "failures": len(failures), "first_failures": failures[:3],
            "requests_per_s": len(latencies) / wall, "rows_per_s": len(latencies) * rows / wall,
            "p50_ms": 1000 * percentile(latencies, 0.50), "p99_ms": 1000 * percentile(latencies, 0.99)}


def oip_body(pixels: np.ndarray) -> str:
    """An Open Inference Protocol infer request for ``pixels`` (rows of raw 0..255 values)."""
    return json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                                   "data": pixels.reshape(-1).tolist()}]})


def oip_sender(url: str, pixels: np.ndarray) -> Callable[[Any], None]:
    body = oip_body(pixels)

    def send(http) -> None:
        answer = http.post(f"{url}/v2/models/mnist/infer", content=body, headers={"content-type": "application/json"})
        answer.raise_for_status()
    return send


def mlflow_sender(url: str, pixels: np.ndarray) -> Callable[[Any], None]:
    body = json.dumps({"inputs": pixels.tolist()})  # raw 0..255 integers: the registered signature is uint8

    def send(http) -> None:
        answer = http.post(f"{url}/invocations", content=body, headers={"content-type": "application/json"})
        answer.raise_for_status()
    return send


def publish_short_run(registry: str, data_dir: Path) -> str:
    from flows.train import train_mnist

    train_mnist(registry=registry, data_dir=str(data_dir), **SHORT_RUN)
    from tasks.registry import open_registry

    return open_registry(registry).production("mnist")


def bench_serving(work: Path) -> dict[str, Any]:
    from tasks.datasets import NUM_PIXELS
    from tests.support.mlflow_server import mlflow_server

    results: dict[str, Any] = {"clients": CLIENTS, "seconds_per_load": SECONDS, "batches": list(BATCHES)}
    procs = []
    with mlflow_server(work / "mlflow") as tracking:
        log("publishing mnist's production model to MLflow (a short flow run) ...")
        version = publish_short_run(tracking.url, work / "data")
        # mlflow models serve starts `uvicorn` by name: this interpreter's scripts come first on PATH.
        scripts = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
            "MLFLOW_TRACKING_URI": tracking.url, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
        ours, theirs = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        train_mnist_cli = str(Path(sys.executable).with_name("train-mnist"))
        mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
        try:
            procs.append(spawn([train_mnist_cli, "serve", "--dataset", "mnist", "--registry", tracking.url, "--port",
                                ours.rsplit(":", 1)[1], "--log-level", "warning"], env, work, work / "serve.log"))
            procs.append(spawn([mlflow_cli, "models", "serve", "-m", "models:/mnist@production", "--env-manager",
                                "local", "--host", "127.0.0.1", "--port", theirs.rsplit(":", 1)[1]], env, work,
                               work / "mlflow-serve.log"))
            wait_for(lambda: _ok(f"{ours}/v2/health/ready"), 300, "train-mnist serve", work / "serve.log", procs[0])
            wait_for(lambda: _ok(f"{theirs}/ping"), 300, "mlflow models serve", work / "mlflow-serve.log", procs[1])
            pixels = np.random.default_rng(0).integers(0, 256, (max(BATCHES), NUM_PIXELS), dtype=np.uint8)
            for rows in BATCHES:
                for name, url, sender in (("train_mnist", ours, oip_sender), ("mlflow", theirs, mlflow_sender)):
                    log(f"{name}, batch {rows}: {CLIENTS} clients for {SECONDS:g} s ...")
                    load(sender(url, pixels[:rows]), rows, seconds=2.0)  # warm-up, not counted
                    results[f"{name}_batch_{rows}"] = load(sender(url, pixels[:rows]), rows)
                ratio = results[f"train_mnist_batch_{rows}"]["rows_per_s"] / results[f"mlflow_batch_{rows}"]["rows_per_s"]
                results[f"rows_per_s_ratio_batch_{rows}"] = ratio
            results["p99_ratio_batch_1"] = results["train_mnist_batch_1"]["p99_ms"] / results["mlflow_batch_1"]["p99_ms"]
            log("train-mnist serve at batch 1 with and without a scraper on /metrics ...")
            results["metrics_scrape"] = scrape_cost(ours, pixels[:1])
            log("moving the alias with a second flow run; timing the swap ...")
            results["swap"] = time_the_swap(ours, tracking.url, work, version, pixels[:1])
        finally:
            for proc in procs:
                stop(proc)
    results["served_version"] = version
    return results


SCRAPE_EVERY_S = 0.1  # 150x Prometheus's usual 15 s: a scrape's cost, if any, shows
SCRAPE_ROUNDS = 3


def scrape_cost(url: str, pixels: np.ndarray) -> dict[str, Any]:
    """The same batch-1 load with and without a thread reading ``/metrics`` every ``SCRAPE_EVERY_S``, alternated
    ``SCRAPE_ROUNDS`` times; the median of each side and their ratio (1.0: no cost)."""
    import httpx

    def scraper(stop: threading.Event, scrapes: list[int]) -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.wait(SCRAPE_EVERY_S):
                http.get(f"{url}/metrics").raise_for_status()
                scrapes[0] += 1

    sides: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    scrapes = [0]
    for _ in range(SCRAPE_ROUNDS):
        for side in sides:
            stop = threading.Event()
            thread = threading.Thread(target=scraper, args=(stop, scrapes)) if side == "with" else None
            if thread:
                thread.start()
            sides[side].append(load(oip_sender(url, pixels), len(pixels), seconds=SECONDS / 2))
            stop.set()
            if thread:
                thread.join()
    median = {side: sorted(r["rows_per_s"] for r in runs)[len(runs) // 2] for side, runs in sides.items()}
    p99 = {side: sorted(r["p99_ms"] for r in runs)[len(runs) // 2] for side, runs in sides.items()}
    return {"rows_per_s": median, "p99_ms": p99, "rows_per_s_ratio": median["with"] / median["without"],
            "scrapes": scrapes[0], "scrape_every_s": SCRAPE_EVERY_S, "rounds": sides,
            "failures": sum(r["failures"] for runs in sides.values() for r in runs)}


def time_the_swap(url: str, registry: str, work: Path, old: str, pixels: np.ndarray) -> dict[str, Any]:
    """Publish a new version, then poll until the server answers with it: seconds from the alias move."""
    import httpx

    new = publish_short_run(registry, work / "data")
    moved = time.monotonic()  # the alias moves at the very end of publishing
    send = oip_body(pixels)
    with httpx.Client(timeout=30) as http:
        while time.monotonic() - moved < 120:
            answer = http.post(f"{url}/v2/models/mnist/infer", content=send,
                               headers={"content-type": "application/json"}).json()
            if answer["model_version"] == new:
                return {"from": old, "to": new, "seconds_to_first_answer": time.monotonic() - moved}
            time.sleep(0.05)
    return {"from": old, "to": new, "seconds_to_first_answer": None}


def _ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
