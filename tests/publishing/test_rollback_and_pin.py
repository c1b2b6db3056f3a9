"""Rollback, pin and unpin on both registries: under the publish lock, fenced, the target's canary first, each a
line of the run log; from the command line (real processes), and a real model server following a rollback
while a client sends requests without pause."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from tasks.publishing.operations import OperationRefused, pin, previous_production, rollback, unpin
from tasks.publishing.publish import ProductionPinned, publish_version
from tasks.registry import open_registry
from tasks.registry.folder import read_production
from tasks.registry.run_log import read_run_log
from tasks.vocabulary import Outcome
from tests.support.processes import free_port, http_ok, spawn, stop, tail, wait_for
from tests.support.publish_worker import registry_candidate
from tests.support.slices import mnist_like_datasets

pytestmark = pytest.mark.slow

TRAIN_MNIST = str(Path(sys.executable).with_name("train-mnist"))


def published(registry, name: str, models, *which: str) -> list[str]:
    """Publish each named model in turn; the versions production named (MLflow: the registered versions)."""
    versions = []
    for model in which:
        done = publish_version(registry, registry_candidate(name, models[model]))
        versions.append(done.registry_version or done.version)
    return versions


def test_the_previous_production_version_comes_from_the_run_log():
    assert previous_production(["a", "b", "c"], "c") == "b"
    assert previous_production(["a", "b", "a"], "a") == "b"  # a rollback back to a: the one before is b
    assert previous_production(["a"], "a") is None and previous_production([], "a") is None


def test_a_folder_rollback_moves_production_back_after_the_canary_and_logs_it(trained_models, tmp_path):
    registry = open_registry(tmp_path / "registry")
    first, second = published(registry, "ops", trained_models, "strong", "strong")
    result = rollback(registry, "ops", reason="bad predictions reported", requested_by="test")
    assert (result.production_before, result.production_after) == (second, first)
    assert read_production(tmp_path / "registry", "ops") == first
    last = read_run_log(tmp_path / "registry", "ops")[-1]
    assert (last.outcome, last.version, last.from_version, last.reason, last.requested_by) == (
        Outcome.ROLLED_BACK, first, second, "bad predictions reported", "test")
    assert rollback(registry, "ops", to=second).production_after == second  # and forward again, by name


def test_a_rollback_that_cannot_be_done_changes_nothing_and_says_why(trained_models, tmp_path):
    root = tmp_path / "registry"
    registry = open_registry(root)
    with pytest.raises(OperationRefused, match="no production version"):
        rollback(registry, "ops")
    [only] = published(registry, "ops", trained_models, "strong")
    with pytest.raises(OperationRefused, match="no earlier production version"):
        rollback(registry, "ops")
    with pytest.raises(OperationRefused, match="does not exist .*pruned by retention"):
        rollback(registry, "ops", to="20250101T000000Z-gone00")
    [later] = published(registry, "ops", trained_models, "strong")
    damaged = root / "ops" / only / "model.keras"
    damaged.write_bytes(b"PK\x03\x04 not a keras archive")
    with pytest.raises(OperationRefused, match="does not load"):
        rollback(registry, "ops", to=only)
    lines = len(read_run_log(root, "ops"))
    assert read_production(root, "ops") == later and len(read_run_log(root, "ops")) == lines


def test_a_pinned_production_holds_while_nightly_runs_still_train_and_record(trained_models, tmp_path):
    root = tmp_path / "registry"
    registry = open_registry(root)
    [first] = published(registry, "ops", trained_models, "strong")
    pin(registry, "ops", reason="holiday freeze", requested_by="test")
    with pytest.raises(OperationRefused, match="pinned already"):
        pin(registry, "ops")
    with pytest.raises(ProductionPinned, match="pinned at .* holiday freeze"):
        publish_version(registry, registry_candidate("ops", trained_models["strong"], "20261209T020000Z-aaaaaa"))
    assert read_production(root, "ops") == first
    entries = read_run_log(root, "ops")
    assert [e.outcome for e in entries] == [Outcome.PUBLISHED, Outcome.PIN, Outcome.PINNED]
    assert entries[-1].test_accuracy is not None  # trained, evaluated and recorded all the same
    unpin(registry, "ops", reason="freeze over")
    later = publish_version(registry, registry_candidate("ops", trained_models["strong"], "20261210T020000Z-bbbbbb"))
    assert read_production(root, "ops") == later.version
    with pytest.raises(OperationRefused, match="not pinned"):
        unpin(registry, "ops")


def test_rollback_pin_and_unpin_on_mlflow(mlflow, trained_models):
    registry = open_registry(mlflow.url)
    name = "ops-mlflow"
    published(registry, name, trained_models, "strong", "strong")
    assert registry.production(name) == "2"
    assert rollback(registry, name, reason="r").production_after == "1"
    assert registry.production(name) == "1" and registry.production_history(name) == ["1", "2", "1"]
    pin(registry, name, reason="freeze")
    with pytest.raises(ProductionPinned):
        publish_version(registry, registry_candidate(name, trained_models["strong"], "v-held"))
    assert registry.production(name) == "1"
    unpin(registry, name)
    assert registry.pin(name) is None
    client = registry.mlflow.client
    experiment = client.get_experiment_by_name(f"train-mnist/{name}")
    decisions = {r.data.tags["train_mnist.decision"] for r in client.search_runs([experiment.experiment_id])}
    assert {"rolled_back", "pin", "unpin", "pinned"} <= decisions


def test_the_command_line_acts_in_one_line_and_refuses_in_one_line(trained_models, tmp_path):
    root = tmp_path / "registry"
    datasets = tmp_path / "datasets.toml"
    datasets.write_text(mnist_like_datasets("ops"))
    first, second = published(open_registry(root), "ops", trained_models, "strong", "strong")
    common = ["--dataset", "ops", "--registry", str(root), "--datasets-file", str(datasets)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([TRAIN_MNIST, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    done = cli("rollback", *common, "--reason", "night of 12-06")
    assert done.returncode == 0 and f"production rolled back from {second} to {first}" in done.stdout, done.stderr
    refused = cli("rollback", *common, "--to", "20250101T000000Z-gone00")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1 and "does not exist" in refused.stderr
    unknown = cli("pin", "--dataset", "nope", "--registry", str(root), "--datasets-file", str(datasets))
    assert unknown.returncode == 2 and "unknown dataset" in unknown.stderr and "Traceback" not in unknown.stderr
    assert cli("pin", *common, "--reason", "freeze").returncode == 0
    assert cli("unpin", *common).returncode == 0
    assert read_production(root, "ops") == first


def test_a_served_model_follows_a_rollback_with_no_failed_request(trained_models, tmp_path):
    root = tmp_path / "registry"
    datasets = tmp_path / "datasets.toml"
    datasets.write_text(mnist_like_datasets("ops-served"))
    registry = open_registry(root)
    first, second = published(registry, "ops-served", trained_models, "strong", "strong")
    port, log = free_port(), tmp_path / "serve.log"
    proc = spawn([TRAIN_MNIST, "serve", "--dataset", "ops-served", "--registry", str(root), "--datasets-file",
                  str(datasets), "--port", str(port), "--poll-seconds", "1"], None, tmp_path, log)
    url = f"http://127.0.0.1:{port}/v2/models/ops-served/infer"
    body = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]}
    seen: list[tuple[int, str | None]] = []
    done = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                try:
                    answer = http.post(url, json=body)
                    seen.append((answer.status_code, answer.json().get("model_version")))
                except httpx.HTTPError as exc:
                    seen.append((0, str(exc)))

    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/v2/health/ready"), 180, "serve ready", log, proc)
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        wait_for(lambda: any(v == second for _, v in seen), 60, f"answers from {second}", log, proc)
        rollback(registry, "ops-served", reason="served model misbehaves")
        wait_for(lambda: seen[-1][1] == first, 60, f"answers from {first} after the rollback", log, proc)
        done.set()
        thread.join(30)
    finally:
        done.set()
        stop(proc)
        print(tail(log, 10))
    assert {status for status, _ in seen} == {200}, [s for s in seen if s[0] != 200][:5]
    versions = [v for _, v in seen]
    assert versions.index(first) > versions.index(second) and np.all(
        [v == first for v in versions[versions.index(first):]])
