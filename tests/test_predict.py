"""``train-mnist predict`` and ``load_production_model`` against a folder registry with a real published model."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.convert import convert_to_parquet
from tasks.datasets import PIXEL_COLUMNS
from tasks.evaluate import evaluate_model, read_metrics
from tasks.predict import NoProductionModel, load_production_model
from tasks.train import TrainConfig, train_model
from tests.support.publish_worker import LINEAGE, PASSED, publish_model

TRAIN_MNIST = str(Path(sys.executable).with_name("train-mnist"))
ROWS = 40


@pytest.fixture(scope="module")
def registry(mnist_slice, slice_mirror, tmp_path_factory):
    """A registry whose mnist production model is a real MLP published through publish_version."""
    root = tmp_path_factory.mktemp("predict")
    parquet = {split: convert_to_parquet(slice_mirror / mnist_slice.split(split).path, root / f"{split}.parquet",
                                         bool(mnist_slice.header)) for split in ("train", "test")}
    run = root / "run"
    model = train_model(parquet["train"], 10, TrainConfig(model="mlp", epochs=2, train_rows=2000), run)
    metrics = read_metrics(evaluate_model(model, parquet["test"], list(mnist_slice.class_names), run))
    registry = root / "registry"
    publish_model(registry, "mnist", "20250101T000000Z-pred00", model, metrics, PASSED, LINEAGE,
                  test_parquet=parquet["test"], predictions_path=run / "predictions.npy")
    return registry


@pytest.fixture(scope="module")
def rows(mnist_slice, slice_mirror) -> np.ndarray:
    with gzip.open(slice_mirror / mnist_slice.test.path, "rt") as fh:
        return np.array([[int(v) for v in fh.readline().split(",")] for _ in range(ROWS)])


def write_csv(path: Path, matrix: np.ndarray, header: list[str] | None = None) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(matrix.tolist())
    return path


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TRAIN_MNIST, "predict", *args], capture_output=True, text=True, timeout=300)


def test_load_production_model_returns_the_published_model(registry, rows):
    production = load_production_model("mnist", registry)
    assert production.version == "20250101T000000Z-pred00"
    assert production.path == str(registry / "mnist" / production.version / "model.keras")
    probabilities = np.asarray(production.model.predict(rows[:, 1:], verbose=0))
    assert probabilities.shape == (ROWS, 10) and (probabilities.argmax(axis=1) == rows[:, 0]).mean() > 0.6


def test_no_production_model_is_a_clear_error(tmp_path):
    with pytest.raises(NoProductionModel, match=r"mnist: no production model in .*; publish one with"):
        load_production_model("mnist", tmp_path)


@pytest.mark.parametrize("layout", ["training layout", "pixels only, with header"])
def test_predict_writes_labels_and_probabilities(registry, rows, tmp_path, layout):
    if layout == "training layout":
        source = write_csv(tmp_path / "rows.csv", rows)
    else:
        source = write_csv(tmp_path / "rows.csv", rows[:, 1:], header=list(PIXEL_COLUMNS))
    result = predict("--dataset", "mnist", str(source), "--registry", str(registry))
    assert result.returncode == 0, result.stderr
    output = tmp_path / "rows.predictions.csv"
    assert f"scored {ROWS} rows with mnist 20250101T000000Z-pred00 -> {output}" in result.stdout
    with open(output, newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["row", "predicted", "predicted_name", *(f"p_{i}" for i in range(10))]
    body = table[1:]
    assert [int(r[0]) for r in body] == list(range(1, ROWS + 1))
    probabilities = np.array([[float(v) for v in r[3:]] for r in body])
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    expected = load_production_model("mnist", registry).model.predict(rows[:, 1:], verbose=0).argmax(axis=1)
    assert [int(r[1]) for r in body] == expected.tolist() == probabilities.argmax(axis=1).tolist()


def test_input_is_validated_like_training_data(registry, rows, tmp_path):
    bad = rows.copy()
    bad[2, 5] = 300  # third data row, column pixel5
    source = write_csv(tmp_path / "bad.csv", bad)
    result = predict("--dataset", "mnist", str(source), "--registry", str(registry))
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "bad.csv: not scored" in message and "pixel value above 255" in message, message
    assert "line 3" in message and "pixel5" in message, message
    assert not (tmp_path / "bad.predictions.csv").exists()

    short = write_csv(tmp_path / "short.csv", rows[:, :100])
    result = predict("--dataset", "mnist", str(short), "--registry", str(registry))
    assert result.returncode == 1 and "short.csv" in result.stderr and "column layout" in result.stderr, result.stderr
