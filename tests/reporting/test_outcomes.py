"""What a user sees, read back through the Prefect API: run names, state messages, logs and artifacts.

Short flows on slices of the real MNIST files (described in a datasets file, so nothing is pinned to
the full files) against Prefect's test server. Expected failures (a failed gate, failed validation)
must end the runs Failed with one clean message, logged once, without a traceback; the parent
``train-mnist`` run carries a summary of every dataset with links to the dataset runs.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

import tasks.publishing.publish
from flows.train import train_mnist
from tasks.registry.folder import list_versions, read_production
from tasks.registry.run_log import read_run_log

DATASETS_TOML = """
[[dataset]]
name = "{name}"
class_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
train = {{ path = "mnist/mnist_train.csv.gz" }}
test = {{ path = "{test}" }}
gates = {{ min_accuracy = 0.5, min_class_recall = 0.0 }}
"""
SHORT = {"model": "mlp", "epochs": 1}
LOG_DEADLINE_S = 60


@pytest.fixture(scope="module")
def mirror(slice_mirror, tmp_path_factory) -> Path:
    """The slice mirror plus a test file with one pixel out of range on line 3."""
    bad = slice_mirror / "mnist" / "bad_test.csv.gz"
    with gzip.open(slice_mirror / "mnist" / "mnist_test.csv.gz", "rt") as fin:
        lines = fin.read().splitlines()
    fields = lines[2].split(",")
    fields[100] = "300"
    lines[2] = ",".join(fields)
    with gzip.open(bad, "wt") as fout:
        fout.write("\n".join(lines) + "\n")
    return slice_mirror


@pytest.fixture(scope="module")
def datasets_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("datasets") / "datasets.toml"
    path.write_text(DATASETS_TOML.format(name="tiny", test="mnist/mnist_test.csv.gz")
                    + DATASETS_TOML.format(name="tiny-bad", test="mnist/bad_test.csv.gz"))
    return path


def run(tmp: Path, mirror: Path, datasets_file: Path, **params):
    return train_mnist(source=str(mirror), datasets_file=str(datasets_file), registry=str(tmp / "registry"),
                       data_dir=str(tmp / "data"), return_state=True, **{**SHORT, **params})


def children(parent_id: UUID):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def artifacts_of(run_id: UUID) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a.data for a in found if a.key}


def logs_of(parent: UUID, *others: UUID) -> list:
    """Every log of the runs, once the parent's last line ("Finished in state ...") has reached the API."""
    deadline = time.monotonic() + LOG_DEADLINE_S
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent, *others])))
        if any(log.flow_run_id == parent and log.message.startswith("Finished in state") for log in logs):
            return logs
        if time.monotonic() > deadline:
            pytest.fail(f"the parent run's logs did not reach the API within {LOG_DEADLINE_S} s")
        time.sleep(0.5)


def family(state) -> tuple[UUID, list]:
    parent = state.state_details.flow_run_id
    return parent, children(parent)


@pytest.fixture(scope="module")
def gate_failure(prefect_api, mirror, datasets_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    return run(tmp, mirror, datasets_file, dataset="tiny", min_accuracy=0.999), tmp


def test_failed_gate_ends_failed_with_one_clean_message(gate_failure):
    state, tmp = gate_failure
    assert state.is_failed()
    lines = state.message.splitlines()
    assert lines[0] == "1 of 1 dataset(s) not published: tiny"
    assert lines[1] == "" and lines[2] == "tiny: gate failed, nothing published"
    assert any(line.startswith("- FAIL min_accuracy: test_accuracy 0.") and line.endswith("< threshold 0.9990")
               for line in lines), state.message
    parent, [child] = family(state)
    assert child.state_type.value == "FAILED"
    assert child.state.message.splitlines()[0] == "tiny: gate failed, nothing published"
    logs = logs_of(parent, child.id)
    errors = [log for log in logs if log.level >= 40]
    assert len([e for e in errors if "FAIL min_accuracy" in e.message]) == 1, [e.message for e in errors]
    assert not [log.message for log in logs if "Traceback" in log.message or "exited with unexpected" in log.message]
    assert list_versions(tmp / "registry", "tiny") == []


def test_failed_gate_still_shows_the_numbers_marked_not_published(gate_failure):
    state, _ = gate_failure
    parent, [child] = family(state)
    child_artifacts = artifacts_of(child.id)
    assert child_artifacts["tiny-summary"].startswith("# tiny: NOT PUBLISHED")
    assert "| true \\ predicted | 0 | 1 |" in child_artifacts["tiny-summary"]
    assert "file://" not in child_artifacts["tiny-summary"]
    table = json.loads(child_artifacts["tiny-confusion-matrix"]) if isinstance(
        child_artifacts["tiny-confusion-matrix"], str) else child_artifacts["tiny-confusion-matrix"]
    assert list(table[0])[0] == "true class" and list(table[0])[-1] == "recall"
    summary = artifacts_of(parent)["train-mnist-summary"]
    row = next(line for line in summary.splitlines() if line.startswith("| [tiny]("))
    assert "**NOT PUBLISHED**: gate failed |" in row and "FAILED (1 check(s))" in row
    assert f"/runs/flow-run/{child.id}" in row
    logged = [log.message for log in logs_of(parent) if log.flow_run_id == parent]
    assert any(m.startswith("tiny: NOT PUBLISHED (gate failed") and "test accuracy 0." in m for m in logged), logged


def test_published_run_summary_names_version_accuracy_gate_champion_and_links(prefect_api, mirror, datasets_file,
                                                                             tmp_path):
    state = run(tmp_path, mirror, datasets_file, dataset="tiny")
    assert state.is_completed(), state.message
    version = state.result()["tiny"]
    assert read_production(tmp_path / "registry", "tiny") == version
    parent, [child] = family(state)
    with get_client(sync_client=True) as client:
        parent_run = client.read_flow_run(parent)
    assert parent_run.name == f"tiny {version}" and child.name == f"tiny {version}"
    assert version.endswith(str(parent).replace("-", "")[:6])
    summary = artifacts_of(parent)["train-mnist-summary"]
    row = next(line for line in summary.splitlines() if line.startswith("| [tiny]("))
    assert f"| published {version} |" in row and "| passed |" in row
    assert "promoted (first version)" in row and f"/runs/flow-run/{child.id}" in row
    child_summary = artifacts_of(child.id)["tiny-summary"]
    assert child_summary.startswith(f"# tiny: published {version}")
    assert f"`{tmp_path / 'registry' / 'tiny' / version}`" in child_summary
    card = (tmp_path / "registry" / "tiny" / version / "model_card.md").read_text()
    assert '"model": "mlp"' in card and not any(k in card for k in ('"translate"', '"rotate"', '"zoom"'))
    html = (tmp_path / "data" / "runs" / "tiny" / version / "validation.html").read_text()
    assert "<script" not in html and "http" not in html.split("</style>")[0]
    assert "validation.html" in child_summary


def test_failed_validation_is_one_error_with_its_lines_and_an_offline_report(prefect_api, mirror, datasets_file,
                                                                           tmp_path):
    state = run(tmp_path, mirror, datasets_file, dataset="tiny-bad")
    assert state.is_failed()
    parent, [child] = family(state)
    first = child.state.message.splitlines()[0]
    assert first.startswith("tiny-bad: data failed validation")
    logs = logs_of(parent, child.id)
    errors = [log.message for log in logs if log.level >= 40]
    assert len([e for e in errors if "data failed validation" in e]) == 1, errors
    assert not [log.message for log in logs if "Traceback" in log.message]
    report = next(Path(line.split("`")[1]) for line in artifacts_of(parent)["train-mnist-summary"].splitlines()
                  if "Validation report" in line)
    html = report.read_text()
    assert report.name == "validation.html" and "line 3" in html and "FAIL" in html and "<script" not in html
    # A night that stopped at validation is in the dataset's history too.
    [entry] = read_run_log(tmp_path / "registry", "tiny-bad")
    assert (entry.outcome, entry.stage) == ("failed", "validate") and "data failed validation" in entry.reason


def test_artifacts_failing_after_publish_is_a_warning_and_the_version_is_published(prefect_api, mirror, datasets_file,
                                                                                  tmp_path, monkeypatch):
    def unavailable(*args, **kwargs):
        raise ConnectionError("artifact API unavailable")

    monkeypatch.setattr(tasks.publishing.publish, "_create_artifacts", unavailable)
    state = run(tmp_path, mirror, datasets_file, dataset="tiny")
    assert state.is_completed(), state.message
    version = state.result()["tiny"]
    assert read_production(tmp_path / "registry", "tiny") == version
    parent, [child] = family(state)
    warnings = [log.message for log in logs_of(parent, child.id) if log.level == 30]
    assert any("is published (production points at it), but its Prefect artifacts could not be created" in w
               and "artifact API unavailable" in w for w in warnings), warnings


def test_a_damaged_production_pointer_stops_the_run_before_training_as_stage_champion(prefect_api, mirror,
                                                                                   datasets_file, tmp_path):
    """Before: a ChampionUnreadable raised before training was recorded in the history as stage download."""
    pointer = tmp_path / "registry" / "tiny" / "production"
    pointer.parent.mkdir(parents=True)
    pointer.write_text("no-such-version\n")
    state = run(tmp_path, mirror, datasets_file, dataset="tiny")
    assert state.is_failed()
    assert "production pointer" in state.message and "no-such-version" in state.message
    [entry] = read_run_log(tmp_path / "registry", "tiny")
    assert (entry.outcome, entry.stage) == ("failed", "champion"), entry
    parent, _ = family(state)
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(parent).labels
    assert labels["train-mnist.failed"] == "tiny" and labels["train-mnist.tiny.stage"] == "champion"
