"""``train-mnist predict`` and ``load_production_model`` against a folder registry with a real published model."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.conversion.convert import convert_to_parquet
from tasks.datasets import PIXEL_COLUMNS
from tasks.evaluation.evaluate import evaluate_model
from tasks.serving.predict import NoProductionModel, load_production_model
from tasks.training.recipes import TrainConfig
from tasks.training.train import train_model
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
    metrics = evaluate_model(model, parquet["test"], list(mnist_slice.class_names), run).metrics
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


def test_a_headerless_file_of_784_fields_is_refused_as_ambiguous(registry, rows, tmp_path):
    """Before: the training layout with its last column lost was read as pixels only, every pixel shifted by one."""
    lost_column = write_csv(tmp_path / "lost.csv", rows[:, :-1])
    result = predict("--dataset", "mnist", str(lost_column), "--registry", str(registry))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "lost.csv: rows of 784 fields and no header" in result.stderr and "--pixels-only" in result.stderr
    assert not (tmp_path / "lost.predictions.csv").exists()


def test_pixels_only_without_a_header_is_scored_when_the_option_says_so(registry, rows, tmp_path):
    source = write_csv(tmp_path / "pixels.csv", rows[:, 1:])
    result = predict("--dataset", "mnist", str(source), "--registry", str(registry), "--pixels-only")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "pixels.predictions.csv", newline="") as fh:
        predicted = [int(r[1]) for r in list(csv.reader(fh))[1:]]
    expected = load_production_model("mnist", registry).model.predict(rows[:, 1:], verbose=0).argmax(axis=1)
    assert predicted == expected.tolist()
    training = write_csv(tmp_path / "training.csv", rows)  # the option refuses what is not pixels only
    result = predict("--dataset", "mnist", str(training), "--registry", str(registry), "--pixels-only")
    assert result.returncode == 1 and "--pixels-only, but its first line has 785 fields" in result.stderr


@pytest.mark.parametrize("damage", ["pointer names no version", "model file gone", "mlflow unreachable"])
def test_an_unreadable_production_model_is_one_line_not_a_traceback(registry, rows, tmp_path, damage):
    import shutil

    source = write_csv(tmp_path / "rows.csv", rows)
    env = None
    if damage == "mlflow unreachable":
        where = "http://127.0.0.1:9"  # nothing listens there
        env = {**__import__("os").environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    else:
        where = str(shutil.copytree(registry, tmp_path / "registry"))
        version = (tmp_path / "registry" / "mnist" / "production").read_text().strip()
        if damage == "pointer names no version":
            (tmp_path / "registry" / "mnist" / "production").write_text("no-such-version\n")
        else:
            (tmp_path / "registry" / "mnist" / version / "model.keras").unlink()
    result = subprocess.run([TRAIN_MNIST, "predict", "--dataset", "mnist", str(source), "--registry", where],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("train-mnist predict:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "mnist" in lines[0]
