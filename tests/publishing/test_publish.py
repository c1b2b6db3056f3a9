"""Publishing's plain functions: refusals leave the registry alone; the files a version holds say what they must."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from tasks.artifacts import VERSION_FILES
from tasks.publishing.model_card import confusion_matrix_csv, confusion_matrix_png, model_card
from tasks.publishing.promote import PromotionPolicy, first_version_decision
from tasks.publishing.publish import GateFailed
from tasks.registry import folder as registry_module
from tasks.registry.folder import STAGING_PREFIX, list_versions, read_production
from tasks.results import GateDecision
from tests.support.publish_worker import (
    CLASS_NAMES,
    DUMMY_MODEL,
    LINEAGE,
    PASSED,
    assert_registry_consistent,
    leftovers,
    make_candidate,
    publish_candidate,
)

DATASET = "unit"
FAILED = GateDecision(passed=False, reasons=["FAIL min_accuracy: test_accuracy 0.4000 < threshold 0.9000"])


def test_publish_writes_a_complete_version_and_moves_the_pointer(tmp_path, candidate):
    registry = tmp_path / "registry"
    first = publish_candidate(registry, DATASET, candidate, "20250101T000000Z-aaaaaa")
    assert read_production(registry, DATASET) == first.version
    assert sorted(p.name for p in first.path.iterdir()) == sorted(VERSION_FILES)
    doc = json.loads((first.path / "metrics.json").read_text())
    assert doc["version"] == first.version and doc["gate"] == PASSED.model_dump()
    assert doc["test_accuracy"] == candidate.metrics.test_accuracy and doc["data"] == LINEAGE.as_document()["data"]
    assert doc["promotion"]["champion_version"] is None and doc["promotion"]["promoted"] is True

    second = publish_candidate(registry, DATASET, candidate, "20250102T000000Z-bbbbbb",
                               files={"training_curves.png": candidate.model_path})
    assert read_production(registry, DATASET) == second.version
    assert list_versions(registry, DATASET) == [first.version, second.version]
    assert (second.path / "training_curves.png").read_bytes() == DUMMY_MODEL
    promotion = json.loads((second.path / "metrics.json").read_text())["promotion"]
    assert promotion["champion_version"] == first.version
    assert (promotion["challenger_only_right"], promotion["champion_only_right"], promotion["p_value"]) == (0, 0, 1.0)
    assert_registry_consistent(registry, DATASET)


def test_failed_gate_raises_and_leaves_pointer_and_versions_untouched(tmp_path, candidate):
    registry = tmp_path / "registry"
    published = publish_candidate(registry, DATASET, candidate)
    before = (read_production(registry, DATASET), list_versions(registry, DATASET),
              (published.path / "model.keras").read_bytes())
    with pytest.raises(GateFailed, match=r"unit: gate failed, nothing published:\n- FAIL min_accuracy"):
        publish_candidate(registry, DATASET, candidate, decision=FAILED)
    assert (read_production(registry, DATASET), list_versions(registry, DATASET),
            (published.path / "model.keras").read_bytes()) == before
    assert leftovers(registry, DATASET) == []


def test_failed_gate_on_an_empty_registry_creates_nothing(tmp_path, candidate):
    registry = tmp_path / "registry"
    with pytest.raises(GateFailed):
        publish_candidate(registry, DATASET, candidate, decision=FAILED)
    assert read_production(registry, DATASET) is None and list_versions(registry, DATASET) == []


def test_an_existing_version_is_never_overwritten(tmp_path, candidate):
    registry = tmp_path / "registry"
    published = publish_candidate(registry, DATASET, candidate, "20250101T000000Z-aaaaaa")
    other = make_candidate(tmp_path / "other", np.arange(80) % 10, np.arange(80) % 10, model_bytes=b"other",
                           test_parquet=candidate.test_parquet)
    with pytest.raises(FileExistsError, match="20250101T000000Z-aaaaaa already exists"):
        publish_candidate(registry, DATASET, other, "20250101T000000Z-aaaaaa")
    assert (published.path / "model.keras").read_bytes() == DUMMY_MODEL
    assert list_versions(registry, DATASET) == [published.version]


def test_stale_staging_folders_are_cleared_by_the_next_publish(tmp_path, candidate):
    registry = tmp_path / "registry"
    stale = registry / DATASET / f"{STAGING_PREFIX}20250101T000000Z-dead00-12345678"
    stale.mkdir(parents=True)
    (stale / "model.keras").write_bytes(b"half")
    (registry / DATASET / ".production.abc.tmp").write_text("20250101T000000Z-dead00\n")
    assert list_versions(registry, DATASET) == []  # hidden: never a visible version
    published = publish_candidate(registry, DATASET, candidate)
    assert leftovers(registry, DATASET) == [] and list_versions(registry, DATASET) == [published.version]


def test_predictions_that_do_not_match_the_metrics_are_refused(tmp_path, candidate):
    registry = tmp_path / "registry"
    np.save(candidate.predictions_path, np.zeros(80, np.int16))  # a different evaluation's predictions
    with pytest.raises(ValueError, match=r"accuracy 0\.100000 on \S+test\.parquet, "
                                         r"but metrics say 0\.775000"):
        publish_candidate(registry, DATASET, candidate)
    np.save(candidate.predictions_path, np.zeros(79, np.int16))
    with pytest.raises(ValueError, match=r"\(79,\) predictions and metrics of 80 rows"):
        publish_candidate(registry, DATASET, candidate)
    assert list_versions(registry, DATASET) == []


def test_confusion_matrix_csv_has_true_rows_and_predicted_columns(candidate):
    metrics = candidate.metrics
    rows = list(csv.reader(io.StringIO(confusion_matrix_csv(metrics).decode())))
    assert rows[0] == ["true\\predicted", *CLASS_NAMES]
    assert [row[0] for row in rows[1:]] == CLASS_NAMES
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.tolist() == metrics.confusion_matrix
    assert counts.sum() == metrics.test_rows == 80
    assert counts.sum(axis=1).tolist() == [8] * 10  # 8 rows of each true class
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics.test_accuracy)


def test_confusion_matrix_png_is_a_png(candidate):
    data = confusion_matrix_png(candidate.metrics, "unit test")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000  # a rendered heatmap, not an empty image


def test_model_card_states_data_parameters_metrics_gate_and_champion(candidate):
    metrics = candidate.metrics
    labels = np.arange(80) % 10
    promotion = first_version_decision(labels, np.load(candidate.predictions_path), PromotionPolicy())
    card = model_card(DATASET, "20250101T000000Z-aaaaaa", metrics, PASSED, promotion, LINEAGE)
    assert card.startswith("# unit model 20250101T000000Z-aaaaaa\n")
    for split, info in LINEAGE.data.items():
        assert f"| {split} | {info.location} | `{info.sha256}` |" in card
    params = json.loads(card.split("## Parameters")[1].split("```json")[1].split("```")[0])
    assert params == LINEAGE.parameters
    assert f"test accuracy: **{metrics.test_accuracy:.4f}** on 80 rows" in card
    for name in CLASS_NAMES:
        assert f"| {name} | {metrics.precision[name]:.4f} | {metrics.recall[name]:.4f} |" in card
    gate = card.split("## Gate decision")[1].split("##")[0]
    assert "**PASSED**" in gate and f"- {PASSED.reasons[0]}" in gate
    assert "**PROMOTED**: no champion (first version of this dataset); the absolute gates alone decided" in card

    failed_card = model_card(DATASET, "v", metrics, FAILED, promotion, LINEAGE)
    assert "**FAILED**" in failed_card and FAILED.reasons[0] in failed_card


def test_a_failure_after_the_pointer_moved_leaves_the_version_published(tmp_path, candidate, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OSError("disk trouble while pruning")

    monkeypatch.setattr(registry_module, "prune_versions", broken)
    registry = tmp_path / "registry"
    published = publish_candidate(registry, DATASET, candidate)
    assert read_production(registry, DATASET) == published.version
    assert any("is published, but its history or pruning failed" in r.message and "disk trouble" in r.message
               for r in caplog.records)
