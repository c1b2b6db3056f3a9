"""The per-dataset history and its trend plot, written by publishing."""

from __future__ import annotations

import json

import pytest

from tasks.publishing.publish import GateFailed
from tasks.registry.run_log import (
    RUN_LOG_FILE,
    TREND_FILE,
    RunLogEntry,
    append_entry,
    markdown_table,
    read_run_log,
    render_trend,
)
from tasks.results import GateDecision, drift_numbers
from tasks.vocabulary import Outcome, Stage
from tests.support.publish_worker import (
    LINEAGE,
    PASSED,
    publish_candidate,
    publish_model,
)

DATASET = "history-test"
PNG = b"\x89PNG\r\n\x1a\n"


def validation_report(path, kl: float):
    path.write_text(json.dumps({"drift": {
        "train": {"rows": 3000, "pixel_mean": 33.3, "label_kl": kl, "label_counts": [1, 2]},
        "test": {"rows": 600, "pixel_mean": 33.9, "label_kl": kl * 2, "min_class_share_ratio": 0.9},
        "pair": {"test_in_train_share": 0.0},
        "reference_computed_from_train": {"pixel_mean": 1.0},
    }}))
    return path


def test_drift_numbers_are_the_scalar_drift_values(tmp_path):
    drift = drift_numbers(json.loads(validation_report(tmp_path / "validation.json", 0.01).read_text())["drift"])
    assert drift == {"train.rows": 3000.0, "train.pixel_mean": 33.3, "train.label_kl": 0.01, "test.rows": 600.0,
                     "test.pixel_mean": 33.9, "test.label_kl": 0.02, "test.min_class_share_ratio": 0.9,
                     "pair.test_in_train_share": 0.0}
    assert drift_numbers({}) == {}


def test_a_torn_line_is_skipped_and_never_swallows_the_entry_after_it(tmp_path, caplog):
    append_entry(tmp_path, DATASET, RunLogEntry(version="v1", outcome="published", test_accuracy=0.9))
    with open(tmp_path / DATASET / RUN_LOG_FILE, "ab") as fh:
        fh.write(b'{"version": "v2", "outc')
    assert [e.version for e in read_run_log(tmp_path, DATASET)] == ["v1"]
    append_entry(tmp_path, DATASET, RunLogEntry(version="v3", outcome="failed", stage="download"))
    assert [e.version for e in read_run_log(tmp_path, DATASET)] == ["v1", "v3"]
    assert "1 line(s) of its run log skipped" in caplog.text


def test_a_registry_written_before_the_rename_is_read_under_its_old_names(tmp_path):
    """A registry made by an earlier train-mnist keeps its log as history.jsonl: read first, then runs.jsonl."""
    folder = tmp_path / DATASET
    folder.mkdir()
    old = RunLogEntry(version="20261201T020000Z-aaaaaa", outcome="published", test_accuracy=0.99)
    (folder / "history.jsonl").write_text(old.model_dump_json() + "\n")
    append_entry(tmp_path, DATASET, RunLogEntry(version="20261206T020000Z-bbbbbb", outcome="gate_failed", stage="gate"))
    assert (folder / "history.jsonl").read_text() == old.model_dump_json() + "\n"  # never written again
    assert [(e.version, e.outcome, e.stage) for e in read_run_log(tmp_path, DATASET)] == [
        ("20261201T020000Z-aaaaaa", Outcome.PUBLISHED, None), ("20261206T020000Z-bbbbbb", Outcome.GATE_FAILED, Stage.GATE)]


def test_trend_plot_and_table_show_every_run(tmp_path):
    entries = [RunLogEntry(version=f"2026010{i}T020000Z-aaaaaa", outcome="published" if i != 3 else "gate_failed",
                            test_accuracy=0.99 - i / 100, lowest_class_recall=0.95, drift={"test.label_kl": i / 1000},
                            stage_seconds={"train": 100.0 + i, "validate": 5.0}) for i in range(1, 6)]
    png = render_trend(entries, tmp_path / TREND_FILE, "t")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    table = markdown_table(entries)
    assert table.count("\n") == 2 + len(entries)
    assert "| 20260103T020000Z-aaaaaa |" in table and "gate_failed" in table and "| 0.9600 |" in table


def test_each_publish_and_each_refusal_adds_a_line_and_redraws_the_plot(tmp_path, candidate):
    registry = tmp_path / "registry"
    report = validation_report(tmp_path / "validation.json", 0.005)
    lineage = LINEAGE.model_copy(update={"validation_report": str(report)})
    first = publish_model(registry, DATASET, "20260101T020000Z-aaaaaa", candidate.model_path,
                          candidate.metrics, PASSED, lineage, test_parquet=candidate.test_parquet,
                          predictions_path=candidate.predictions_path,
                          drift=drift_numbers(json.loads(report.read_text())["drift"]))
    failed = GateDecision(passed=False, reasons=["FAIL min_accuracy: test_accuracy 0.8000 < threshold 0.9990"])
    with pytest.raises(GateFailed):
        publish_candidate(registry, DATASET, candidate, "20260102T020000Z-bbbbbb", decision=failed)
    second = publish_candidate(registry, DATASET, candidate, "20260103T020000Z-cccccc")

    entries = read_run_log(registry, DATASET)
    assert [(e.version, e.outcome, e.gate_passed, e.promoted) for e in entries] == [
        (first.version, "published", True, True), ("20260102T020000Z-bbbbbb", "gate_failed", False, None),
        (second.version, "published", True, True)]
    metrics = candidate.metrics
    assert entries[0].test_accuracy == metrics.test_accuracy
    assert entries[0].lowest_class_recall == min(metrics.recall.values())
    assert entries[0].drift["test.label_kl"] == 0.01 and entries[0].canary_latency_s == 0.0
    assert entries[1].stage == "gate" and "threshold 0.9990" in entries[1].reason
    assert entries[2].champion_version == first.version
    assert all(e.stage_seconds["publish"] > 0 for e in entries)
    assert (registry / DATASET / TREND_FILE).read_bytes()[:8] == PNG
    card = (second.path / "model_card.md").read_text()
    assert f"[{TREND_FILE}](../{TREND_FILE})" in card
