"""End to end: the train-mnist flow on the full real data, and its CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.train import train_mnist
from tasks.artifacts import VERSION_FILES
from tasks.registry.folder import list_versions, read_production
from tasks.settings import PROJECT_ROOT

E2E_EPOCHS = 5


@pytest.fixture(scope="module")
def published(prefect_api, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    registry, data_dir = root / "registry", root / "data"
    # The baseline MLP keeps CI short; the nightly recipes (CNNs) are measured by bench/ and the nightly run.
    versions = train_mnist(dataset="all", model="mlp", epochs=E2E_EPOCHS, registry=str(registry),
                           data_dir=str(data_dir))
    return versions, registry, data_dir


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "floor"), [("mnist", 0.97), ("fashion-mnist", 0.85)])
def test_full_run_publishes_a_complete_version_above_the_gate(published, catalog, dataset, floor):
    versions, registry, data_dir = published
    version = versions[dataset]
    assert read_production(registry, dataset) == version
    folder = registry / dataset / version
    assert all((folder / name).is_file() for name in VERSION_FILES)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= floor
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 10000
    assert metrics["gate"]["passed"] is True
    card = (folder / "model_card.md").read_text()
    assert catalog[dataset].train.sha256 in card and catalog[dataset].test.sha256 in card
    assert (folder / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    header = (folder / "confusion_matrix.csv").read_text().splitlines()[0].split(",")
    assert header[1:] == list(catalog[dataset].class_names)
    report = json.loads((data_dir / "runs" / dataset / version / "validation.json").read_text())
    assert report["passed"] and report["drift"]["train"]["rows"] == 60000


@pytest.mark.slow
def test_full_run_creates_prefect_artifacts(published):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="mnist")))
    kinds = {(a.key, a.type) for a in artifacts}
    for dataset in ("mnist", "fashion-mnist"):
        # The matrix is rendered in the summary; no file:// link (browsers refuse to open those from the UI).
        assert {(f"{dataset}-confusion-matrix", "table"), (f"{dataset}-summary", "markdown")} <= kinds
        assert (f"{dataset}-confusion-png", "markdown") not in kinds


@pytest.mark.slow
def test_failed_gate_fails_the_run_and_leaves_production_untouched(published):
    _, registry, data_dir = published
    before = (read_production(registry, "mnist"), list_versions(registry, "mnist"))
    state = train_mnist(dataset="mnist", model="mlp", epochs=1, train_rows=2000, min_accuracy=0.999, registry=str(registry),
                        data_dir=str(data_dir), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"FAIL min_accuracy: test_accuracy 0\.\d{4} < threshold 0\.9990"):
        state.result()
    assert (read_production(registry, "mnist"), list_versions(registry, "mnist")) == before


def _cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "flows" / "train.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_help_lists_the_contract(tmp_path):
    result = _cli("--help", tmp=tmp_path)
    assert result.returncode == 0
    for option in ("--dataset", "--model", "--epochs", "--source", "--registry", "--data-dir", "--datasets-file"):
        assert option in result.stdout


@pytest.mark.slow
def test_cli_exits_non_zero_naming_an_unknown_dataset(tmp_path):
    result = _cli("--dataset", "emnist", "--data-dir", str(tmp_path / "data"), tmp=tmp_path)
    assert result.returncode != 0
    assert "unknown dataset(s) ['emnist']" in result.stderr
    assert not (tmp_path / "data" / "raw").exists(), "work started before the parameters were checked"
