"""The canary: a real model loaded in a fresh Python process, and the promotions it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.conversion.convert import convert_to_parquet
from tasks.conversion.parquet import load_xy
from tasks.evaluation.evaluate import evaluate_model
from tasks.publishing.canary import (
    CANARY_FILE,
    CANARY_ROWS,
    LATENCY_BUDGET_S,
    PROBABILITY_TOLERANCE,
    run_canary,
    write_canary_batch,
)
from tasks.publishing.publish import CanaryRefused
from tasks.registry.folder import STAGING_PREFIX, list_versions, read_production
from tasks.results import read_metrics
from tasks.training.recipes import TrainConfig
from tasks.training.train import train_model
from tests.support.publish_worker import LINEAGE, PASSED, publish_model

DATASET = "canary-test"


@pytest.fixture(scope="module")
def evaluated(mnist_slice, slice_mirror, tmp_path_factory):
    """A real cnn-bn (the nightly recipes' architecture), one epoch on 1,000 rows, evaluated on 600 test rows."""
    root = tmp_path_factory.mktemp("canary")
    parquet = {split: convert_to_parquet(slice_mirror / mnist_slice.split(split).path, root / f"{split}.parquet",
                                         bool(mnist_slice.header)) for split in ("train", "test")}
    run = root / "run"
    model = train_model(parquet["train"], 10, TrainConfig(model="cnn-bn", epochs=1, train_rows=1000), run)
    metrics = evaluate_model(model, parquet["test"], list(mnist_slice.class_names), run).metrics_path
    pixels, _ = load_xy(parquet["test"])
    return {"model": model, "metrics": metrics, "test": parquet["test"], "pixels": pixels,
            "predictions": np.load(run / "predictions.npy"), "probabilities": np.load(run / "probabilities.npy"),
            "run": run}


def canary_rows(evaluated) -> int:
    return min(CANARY_ROWS, len(evaluated["pixels"]))


def test_a_good_model_passes_and_its_times_are_recorded(evaluated, tmp_path):
    batch = write_canary_batch(evaluated["pixels"], evaluated["predictions"], tmp_path / CANARY_FILE,
                               evaluated["probabilities"])
    result = run_canary(evaluated["model"], batch)
    assert result.passed and result.loaded and result.matched, result.reasons
    assert result.rows == canary_rows(evaluated) and result.mismatched_rows == 0
    # Scored as the evaluation scored them (the same rows in one batch): the same numbers.
    assert result.max_probability_difference is not None and result.max_probability_difference <= PROBABILITY_TOLERANCE
    assert 0 < result.load_s and 0 < result.latency_s <= LATENCY_BUDGET_S and result.first_batch_s > 0
    print(f"\ncanary (cnn-bn, fresh process): import {result.import_s:.2f} s, load {result.load_s:.3f} s, "
          f"first batch {result.first_batch_s:.3f} s, latency {result.latency_s:.4f} s per {result.rows} rows")


def test_a_prediction_that_differs_is_refused(evaluated, tmp_path):
    expected = evaluated["predictions"].copy()
    expected[7] = (expected[7] + 1) % 10
    result = run_canary(evaluated["model"], write_canary_batch(evaluated["pixels"], expected, tmp_path / CANARY_FILE))
    assert not result.passed and result.loaded and not result.matched
    assert result.mismatched_rows == 1
    assert any(f"FAIL predictions: 1 of {canary_rows(evaluated)} canary rows differ" in r and "[7]" in r
               for r in result.reasons)


def test_probabilities_that_differ_beyond_the_tolerance_are_refused_even_with_the_same_classes(evaluated, tmp_path):
    recorded = evaluated["probabilities"].astype(np.float64)
    recorded[3] += 10 * PROBABILITY_TOLERANCE * np.sign(0.5 - recorded[3])  # each value moved, the order kept
    batch = write_canary_batch(evaluated["pixels"], evaluated["predictions"], tmp_path / CANARY_FILE, recorded)
    result = run_canary(evaluated["model"], batch)
    assert not result.passed and not result.matched and result.mismatched_rows == 1
    assert any(r.startswith("FAIL probabilities: largest difference") for r in result.reasons), result.reasons


def test_latency_over_the_budget_is_refused(evaluated, tmp_path):
    batch = write_canary_batch(evaluated["pixels"], evaluated["predictions"], tmp_path / CANARY_FILE)
    result = run_canary(evaluated["model"], batch, budget_s=1e-6)
    assert not result.passed and result.matched
    assert any(r.startswith("FAIL latency") and "> budget 0.0000 s" in r for r in result.reasons), result.reasons


def test_a_model_that_does_not_load_is_refused_naming_the_file(evaluated, tmp_path):
    broken = tmp_path / "model.keras"
    broken.write_bytes(evaluated["model"].read_bytes()[:5000])
    batch = write_canary_batch(evaluated["pixels"], evaluated["predictions"], tmp_path / CANARY_FILE)
    result = run_canary(broken, batch)
    assert not result.passed and not result.loaded and result.load_s is None
    assert str(broken) in result.reasons[0] and result.reasons[0].startswith("FAIL load")


def test_publish_records_the_canary_and_a_failing_one_publishes_nothing(evaluated, tmp_path):
    registry = tmp_path / "registry"
    kwargs = {"test_parquet": evaluated["test"], "predictions_path": evaluated["run"] / "predictions.npy",
              "probabilities_path": evaluated["run"] / "probabilities.npy"}
    metrics = read_metrics(evaluated["metrics"])
    good = publish_model(registry, DATASET, "20250101T000000Z-good00", evaluated["model"], metrics, PASSED, LINEAGE,
                         **kwargs)
    doc = json.loads((good.path / "metrics.json").read_text())
    assert doc["canary"]["passed"] and doc["canary"]["load_s"] > 0 and doc["canary"]["latency_s"] > 0
    assert "## Canary" in (good.path / "model_card.md").read_text()
    with np.load(good.path / CANARY_FILE) as saved:
        assert np.array_equal(saved["expected"], evaluated["predictions"][:CANARY_ROWS])
        assert np.array_equal(saved["probabilities"], evaluated["probabilities"][:CANARY_ROWS])
    assert doc["canary"]["max_probability_difference"] <= PROBABILITY_TOLERANCE

    broken = tmp_path / "broken" / "model.keras"
    broken.parent.mkdir()
    broken.write_bytes(b"PK\x03\x04 not a zip archive at all")
    before = sorted(p.relative_to(registry) for p in registry.rglob("*") if p.name not in ("runs.jsonl", "runs.png"))
    with pytest.raises(CanaryRefused, match=r"canary failed in a fresh Python process \(nothing published\)"):
        publish_model(registry, DATASET, "20250102T000000Z-broken", broken, metrics, PASSED, LINEAGE, **kwargs)
    assert read_production(registry, DATASET) == good.version
    assert list_versions(registry, DATASET) == [good.version]
    assert not list((registry / DATASET).glob(f"{STAGING_PREFIX}*"))
    assert sorted(p.relative_to(registry) for p in registry.rglob("*") if p.name not in ("runs.jsonl", "runs.png")) == before


def test_a_model_that_outputs_nan_is_refused_naming_the_count(evaluated, tmp_path):
    """Before: NaN compares unequal to everything, so the probability check let a NaN model through."""
    from tasks.model_io import load_model, save_model, score

    model = load_model(evaluated["model"])
    last = model.layers[-1]
    last.kernel.assign(np.full(last.kernel.shape, np.nan, np.float32))
    broken = save_model(model, tmp_path / "nan" / "model.keras")
    probabilities = score(model, evaluated["pixels"])
    assert np.isnan(probabilities).all()
    batch = write_canary_batch(evaluated["pixels"], probabilities.argmax(axis=1), tmp_path / "canary.npz",
                               probabilities)
    result = run_canary(broken, batch)  # a real fresh process, as at publish
    assert not result.passed and not result.matched
    values = min(len(probabilities), CANARY_ROWS) * probabilities.shape[1]
    assert f"FAIL outputs: {values} of {values} probabilities are not finite (NaN or infinite)" in result.reasons
