"""Passwords in registry and source URLs never reach an output, a log, the run log, an artifact or an alert.

Real processes: the ``train-mnist`` command line publishing to a real ``mlflow server`` with credentials in
its URL, ``train-mnist predict`` and ``train-mnist serve`` against it; in-process flow runs whose source URL
holds a password with each reserved character, against a real HTTP mirror.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import httpx
import pytest

from flows.train import train_mnist
from tasks.download.locations import LocationError, checked_url, redact
from tasks.registry import open_registry
from tests.support.processes import free_port, http_ok, spawn, stop, tail, wait_for
from tests.support.slices import mnist_like_datasets

pytestmark = [pytest.mark.slow, pytest.mark.server]

TRAIN_MNIST = str(Path(sys.executable).with_name("train-mnist"))
PASSWORD = "Pa/ss#w?rd@7"  # every reserved character, percent-encoded where the URL needs it
ENCODED = urllib.parse.quote(PASSWORD, safe="")
RESERVED = "/#?@"


def leaks(text: str, password: str = PASSWORD) -> list[str]:
    """The pieces of ``password`` (split at reserved characters, 3+ characters long) that ``text`` holds."""
    pieces = {password, urllib.parse.quote(password, safe="")}
    for c in RESERVED:
        pieces |= {p for p in password.replace(c, " ").split() if len(p) >= 3}
    return sorted(p for p in pieces if p in text)


@pytest.mark.parametrize("reserved", list(RESERVED))
def test_redaction_hides_a_password_holding_a_reserved_character(reserved):
    password = f"s3c{reserved}ret{reserved}pw"
    for url in (f"http://user:{password}@mirror.internal:8000/data?token=t0ps3cret",
                f"https://user:{password}@mirror.internal/a/b.csv.gz#part", f"http://user:{password}@10.0.0.1"):
        shown = redact(url)
        assert leaks(shown, password) == [] and "t0ps3cret" not in shown, shown
        assert "***@" in shown and "mirror.internal" in shown or "10.0.0.1" in shown
        encoded = url.replace(password, urllib.parse.quote(password, safe=""))
        assert checked_url(encoded, "source") == encoded and leaks(redact(encoded), password) == []
        if reserved == "@":  # both readings agree: the password runs to the last @ before the host
            assert checked_url(url, "source") == url
        else:
            with pytest.raises(LocationError, match="percent-encode") as refused:
                checked_url(url, "source")
            assert leaks(str(refused.value), password) == []


@pytest.mark.parametrize("reserved", list(RESERVED))
def test_a_run_from_a_source_whose_password_holds_a_reserved_character_leaks_it_nowhere(
        reserved, prefect_api, slice_mirror, http_mirror, tmp_path, caplog):
    password = f"Zq9vT{reserved}Xw7mB{reserved}Kp4nR"
    source = http_mirror(slice_mirror).replace("http://", f"http://mirror-user:{password}@")
    datasets = tmp_path / "datasets.toml"
    datasets.write_text(mnist_like_datasets("secret", min_accuracy=0.3))
    registry = tmp_path / "registry"
    state = train_mnist(dataset="secret", source=source, datasets_file=str(datasets), registry=str(registry),
                        data_dir=str(tmp_path / "data"), model="mlp", epochs=1, train_rows=600, return_state=True)
    seen = [state.message or "", caplog.text]
    if reserved == "@":  # unambiguous: it runs, and publishes; nothing it wrote holds the password
        assert state.is_completed(), state.message
        version = state.result()["secret"]
        seen += [p.read_text() for p in (registry / "secret" / version).rglob("*") if p.suffix in (".json", ".md")]
        seen.append((registry / "secret" / "runs.jsonl").read_text())
    else:  # ambiguous: refused before any download, naming how to fix it
        assert state.is_failed() and "percent-encode" in state.message, state.message
        assert not (registry / "secret").exists()
    with prefect_api.client() as client:  # the run's labels and parameters as the alert and the UI read them
        run = client.read_flow_run(state.state_details.flow_run_id)
    seen.append(json.dumps(run.labels))
    assert [leaks(text, password) for text in seen] == [[] for _ in seen]


def test_the_command_line_predict_and_the_server_never_print_mlflow_credentials(mlflow, prefect_server, slice_mirror,
                                                                                   tmp_path):
    """Before: MLflow's client printed "View run ... at http://user:password@..." on every run."""
    registry = mlflow.url.replace("http://", f"http://alice:{ENCODED}@")
    datasets = tmp_path / "datasets.toml"
    datasets.write_text(mnist_like_datasets("secret-mlflow", min_accuracy=0.3))
    env = {**prefect_server.env, "TRAIN_MNIST_DATA_DIR": str(tmp_path / "data")}
    run = subprocess.run([TRAIN_MNIST, "--dataset", "secret-mlflow", "--source", str(slice_mirror), "--registry",
                          registry, "--datasets-file", str(datasets), "--model", "mlp", "--epochs", "1",
                          "--train-rows", "600"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "View run" in run.stdout + run.stderr  # MLflow still says where the run is: without the password
    assert leaks(run.stdout + run.stderr) == []

    csv = tmp_path / "rows.csv"
    csv.write_text("\n".join(",".join(["7"] * 784) for _ in range(3)) + "\n")
    predicted = subprocess.run([TRAIN_MNIST, "predict", "--dataset", "secret-mlflow", "--registry", registry,
                                "--datasets-file", str(datasets), "--pixels-only", str(csv)], capture_output=True,
                               text=True, env=env, cwd=tmp_path, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert leaks(predicted.stdout + predicted.stderr) == []

    port, log = free_port(), tmp_path / "serve.log"
    proc = spawn([TRAIN_MNIST, "serve", "--dataset", "secret-mlflow", "--registry", registry, "--datasets-file",
                  str(datasets), "--port", str(port), "--log-level", "debug"], env, tmp_path, log)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/v2/health/ready"), 180, "serve ready", log, proc)
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/secret-mlflow").text
    finally:
        stop(proc)
    assert leaks(meta) == [] and leaks(log.read_text(errors="replace")) == [], tail(log)
    client = open_registry(registry).mlflow.client
    experiment = client.get_experiment_by_name("train-mnist/secret-mlflow")
    [recorded] = client.search_runs([experiment.experiment_id])
    assert leaks(json.dumps([recorded.data.tags, recorded.data.params])) == []
