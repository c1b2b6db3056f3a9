"""The MLflow registry against a real ``mlflow server`` (SQLite store, artifacts served by the server).

Publishing, a failed gate, a refused challenger and an unreadable champion, with small real Keras models;
then two publishers at once in separate processes, serialised by the Prefect server's global
concurrency limit (they share no lock file).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tasks.publishing.promote import PromotionPolicy
from tasks.publishing.publish import GateFailed, PromotionRefused, publish_version
from tasks.registry import ChampionUnreadable, MlflowRegistry, open_registry
from tasks.registry.mlflow_client import DECISION_TAG, REASON_TAG
from tasks.results import GateDecision
from tests.support.publish_worker import LINEAGE, PASSED, registry_candidate

pytestmark = [pytest.mark.slow, pytest.mark.server]

FAILED = GateDecision(passed=False, reasons=["FAIL min_accuracy: test_accuracy 0.4000 < threshold 0.9000"])


@pytest.fixture(scope="module")
def server(mlflow):
    return mlflow


@pytest.fixture
def dataset(request) -> str:
    """A registered model of its own for each test."""
    return "mnist-" + request.node.name.replace("_", "-")[5:40].strip("-")


def candidate_for(dataset: str, model, version: str, decision: GateDecision = PASSED, tmp: Path | None = None):
    files = {}
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "validation.json").write_text(json.dumps({"passed": True}))
        files["validation.json"] = tmp / "validation.json"
    return registry_candidate(dataset, model, version, decision, files)


def runs_of(registry: MlflowRegistry, dataset: str):
    client = registry.mlflow.client
    experiment = client.get_experiment_by_name(f"train-mnist/{dataset}")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_open_registry_picks_mlflow_for_an_http_url(server):
    assert isinstance(open_registry(server.url), MlflowRegistry)


def test_publish_logs_a_run_registers_the_model_and_moves_the_alias(server, dataset, trained_models, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # get_model_info downloads MLmodel into a mkdtemp
    registry = open_registry(server.url)
    published = publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-strong", tmp=tmp_path))
    assert registry.production(dataset) == published.registry_version == "1"
    run = runs_of(registry, dataset)["v-strong"]
    assert run.data.tags[DECISION_TAG] == "published"
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(trained_models["strong"].metrics.test_accuracy)
    assert {f"recall_{i}" for i in range(10)} | {f"precision_{i}" for i in range(10)} <= set(metrics)
    assert run.data.params["model"] == "mlp"
    assert run.data.tags["data.train.sha256"] == LINEAGE.data["train"].sha256
    artifacts = {a.path for a in registry.mlflow.client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in registry.mlflow.client.list_artifacts(run.info.run_id, "reports")}
    assert {"confusion_matrix.png", "confusion_matrix.csv", "reports/model_card.md", "reports/metrics.json",
            "reports/validation.json"} <= artifacts
    version = registry.mlflow.client.get_model_version(dataset, "1")
    assert version.run_id == run.info.run_id
    # The registered model is the self-contained Keras model: raw 0..255 rows in, probabilities out.
    pixels = np.zeros((3, 784), np.float32)
    probabilities = registry.mlflow.load_model(dataset, "1").predict(pixels, verbose=0)
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    import mlflow

    signature = mlflow.models.get_model_info(f"models:/{dataset}/1").signature
    assert signature.inputs.inputs[0].shape == (-1, 784)


def test_failed_gate_records_why_and_leaves_the_alias(server, dataset, trained_models):
    registry = open_registry(server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-first"))
    with pytest.raises(GateFailed, match="gate failed"):
        publish_version(registry, candidate_for(dataset, trained_models["weak"], "v-gated", FAILED))
    assert registry.production(dataset) == "1"
    run = runs_of(registry, dataset)["v-gated"]
    assert run.data.tags[DECISION_TAG] == "gate_failed"
    assert "FAIL min_accuracy" in run.data.tags[REASON_TAG]
    assert len(registry.mlflow.client.search_model_versions(f"name='{dataset}'")) == 1


def test_refused_challenger_is_registered_but_the_alias_stays(server, dataset, trained_models, tmp_path):
    registry = open_registry(server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-champion"))
    import mlflow

    # As in a fresh process, MLflow's module-level URIs point elsewhere: the registry must not rely on them.
    mlflow.set_tracking_uri(f"file://{tmp_path}/elsewhere")
    mlflow.set_registry_uri(f"file://{tmp_path}/elsewhere")
    registry = open_registry(server.url)
    with pytest.raises(PromotionRefused, match="not promoted over champion 1"):
        publish_version(registry, candidate_for(dataset, trained_models["untrained"], "v-worse"),
                        policy=PromotionPolicy(tolerance=0.0))
    assert registry.production(dataset) == "1"
    run = runs_of(registry, dataset)["v-worse"]
    assert run.data.tags[DECISION_TAG] == "refused"
    metrics = run.data.metrics
    assert metrics["champion_accuracy"] == pytest.approx(trained_models["strong"].metrics.test_accuracy)
    assert metrics["champion_accuracy"] > metrics["challenger_accuracy"]
    assert metrics["discordant_champion_only_right"] > metrics["discordant_challenger_only_right"]
    assert 0 <= metrics["mcnemar_p_value"] < 0.05


def test_unreadable_champion_fails_naming_it_and_leaves_the_alias(server, dataset, trained_models):
    registry = open_registry(server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-champion"))
    model_id = registry.mlflow.client.get_model_version(dataset, "1").source.rsplit("/", 1)[-1]
    damaged = [p for p in (server.root / "artifacts").rglob("*.keras") if model_id in str(p)]
    assert damaged, f"no .keras file of the champion ({model_id}) under {server.root / 'artifacts'}"
    for path in damaged:
        path.write_bytes(b"PK\x03\x04 not a keras archive any more")
    with pytest.raises(ChampionUnreadable, match=rf"{dataset}: champion 1's model models:/{dataset}/1 cannot be "
                                                 r"loaded or scored"):
        publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-challenger"))
    assert registry.production(dataset) == "1"
    assert runs_of(registry, dataset)["v-challenger"].data.tags[DECISION_TAG] == "champion_unreadable"


PUBLISHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tasks.registry.lock import publish_lock, server_configured, url_identity
    registry, dataset, log, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    assert server_configured(), "the publisher must see the Prefect server"
    for i in range(rounds):
        # Each process has a lock folder of its own: only the server can serialise them.
        with publish_lock(lambda: url_identity(registry), dataset, Path(sys.argv[5])) as how:
            with open(log, "a") as fh:
                fh.write(json.dumps({"event": "enter", "t": time.time(), "how": how}) + "\\n")
            time.sleep(0.6)
            with open(log, "a") as fh:
                fh.write(json.dumps({"event": "exit", "t": time.time()}) + "\\n")
""")


def test_two_publishers_without_a_shared_lock_file_take_turns_on_the_server(prefect_server, tmp_path):
    logs = [tmp_path / f"publisher-{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, "http://mlflow.example:5000", "mnist", str(log), "3",
                               str(tmp_path / f"machine-{i}")], env={**prefect_server.env, "PYTHONPATH": "."},
                              cwd=Path(__file__).resolve().parents[2])
             for i, log in enumerate(logs)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    intervals = []
    for log in logs:
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert all("Prefect global concurrency limit" in e["how"] for e in events if e["event"] == "enter")
        intervals += [(a["t"], b["t"]) for a, b in zip(events[::2], events[1::2], strict=True)]
    intervals.sort()
    assert len(intervals) == 6
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert start >= end, f"two publishers held the lock at once: {intervals}"


def test_load_production_model_reads_the_alias(server, dataset, trained_models):
    from tasks.serving.predict import NoProductionModel, load_production_model

    registry = open_registry(server.url)
    with pytest.raises(NoProductionModel, match=rf"{dataset}: no production model in {server.url}"):
        load_production_model(dataset, server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-served"))
    production = load_production_model(dataset, server.url)
    assert (production.version, production.path) == ("1", f"models:/{dataset}/1")
    probabilities = production.model.predict(np.zeros((2, 784), np.float32), verbose=0)
    assert probabilities.shape == (2, 10)


def test_credentials_in_the_tracking_uri_never_reach_locations_messages_or_the_run(server, dataset, trained_models,
                                                                                   tmp_path, monkeypatch):
    """Before: ``http://user:pw@host`` reached logs, the summary's "Registry folder", run URLs and errors."""
    with_credentials = server.url.replace("http://", "http://alice:s3cret@")
    registry = open_registry(with_credentials)
    published = publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-secret", tmp=tmp_path))
    assert "s3cret" not in registry.location and "s3cret" not in repr(registry)
    assert "s3cret" not in published.location and published.location.startswith(f"{server.url}/#/experiments/")
    run = runs_of(registry, dataset)["v-secret"]
    assert "s3cret" not in json.dumps([run.data.tags, run.data.params])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    closed = open_registry("http://alice:s3cret@127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(Exception) as info:  # noqa: B017 - whatever it raises must not quote the password
        closed.production(dataset)
    assert "s3cret" not in str(info.value)


def test_the_alias_moves_only_if_it_still_names_the_compared_champion(server, dataset, trained_models, monkeypatch):
    """A publisher whose lock lapsed (paused) must not move the alias past another run's publish."""
    from tasks.registry.interface import PublishConflict
    from tasks.registry.mlflow_client import PRODUCTION_ALIAS

    registry = open_registry(server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-one"))
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-two"))
    log_model = registry.mlflow._log_model

    def another_run_moves_the_alias_meanwhile(*args, **kwargs):
        version = log_model(*args, **kwargs)
        registry.mlflow.client.set_registered_model_alias(dataset, PRODUCTION_ALIAS, "1")
        return version

    monkeypatch.setattr(registry.mlflow, "_log_model", another_run_moves_the_alias_meanwhile)
    with pytest.raises(PublishConflict, match="moved from 2 to 1"):
        publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-late"))
    assert registry.production(dataset) == "1"
    late = runs_of(registry, dataset)["v-late"]
    assert late.info.status == "FAILED"
    # The loser is registered (the fence lost after logging it) but says so; never "published".
    loser = registry.mlflow.client.get_model_version(dataset, "3")
    assert loser.run_id == late.info.run_id
    for tags in (loser.tags, late.data.tags):
        assert tags[DECISION_TAG] == "refused_publish_conflict"
        assert "moved from 2 to 1" in tags[REASON_TAG]


def test_champion_comparisons_leave_no_temporary_copies_behind(server, dataset, trained_models, tmp_path,
                                                               monkeypatch):
    """Before: every champion load (and profile download) left a model copy in the temporary folder."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    registry = open_registry(server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-first", tmp=tmp_path / "first"))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-second", tmp=tmp_path / "second"))
    registry.champion_profile(dataset, tmp_path / "run")
    assert sorted(p.name for p in scratch.iterdir() if p.name != "train-mnist-locks") == []  # the lock stays


def test_a_run_records_its_datasets_and_the_model_its_uint8_signature_and_input_example(server, dataset,
                                                                                      trained_models, tmp_path,
                                                                                      monkeypatch):
    """What a user of MLflow expects: "Datasets used" on the run; a registered model whose signature is the
    contract (raw 0..255 uint8 rows in, float32 probabilities out), and a request example beside it."""
    import mlflow

    registry = open_registry(server.url)
    publish_version(registry, candidate_for(dataset, trained_models["strong"], "v-data"))
    run = registry.mlflow.client.get_run(runs_of(registry, dataset)["v-data"].info.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {f"{dataset}-train", f"{dataset}-test"}
    for split, info in LINEAGE.data.items():
        logged = inputs[f"{dataset}-{split}"]
        tags = {t.key: t.value for t in logged.tags}
        assert logged.dataset.digest == info.sha256[:36] and tags["sha256"] == info.sha256
        assert tags["mlflow.data.context"] == {"train": "training", "test": "testing"}[split]
        assert info.location in logged.dataset.source and "uint8" in logged.dataset.schema
    registry.mlflow._use_server()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # get_model_info downloads MLmodel into a mkdtemp
    model = mlflow.models.get_model_info(f"models:/{dataset}/1")
    [pixels] = model.signature.inputs.inputs
    [probabilities] = model.signature.outputs.inputs
    assert (pixels.name, pixels.type, pixels.shape) == ("pixels", np.dtype(np.uint8), (-1, 784))
    assert (probabilities.type, probabilities.shape) == (np.dtype(np.float32), (-1, 10))
    example = registry.mlflow.client.download_artifacts(run.info.run_id, "serving_input_example.json",
                                                        str(tmp_path))
    rows = np.array(json.loads(Path(example).read_text())["inputs"])
    assert rows.shape == (2, 784) and rows.min() >= 0 and rows.max() <= 255
