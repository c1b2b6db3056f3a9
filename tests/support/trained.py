"""Small real Keras models on a slice of MNIST, evaluated on one test Parquet file: strong, weak, untrained."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.conversion.convert import convert_to_parquet
from tasks.conversion.parquet import load_xy
from tasks.evaluation.evaluate import evaluate_model
from tasks.model_io import import_keras, save_model
from tasks.results import read_metrics
from tasks.training.architectures import build_model
from tasks.training.recipes import TrainConfig
from tests.support.publish_worker import Candidate


def _fit(train_parquet: Path, dest: Path, rows: int, seed: int) -> Path:
    """A small real MLP: ``rows`` train rows for one epoch (0 rows: untrained, random weights)."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    batch = 32
    model = build_model(TrainConfig(model="mlp", epochs=1, seed=seed), 10, steps_per_epoch=max(1, -(-rows // batch)))
    if rows:
        pixels, labels = load_xy(train_parquet, rows)
        model.fit(pixels, labels, epochs=1, batch_size=batch, verbose=0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return save_model(model, dest)


@pytest.fixture(scope="module")
def trained_models(mnist_slice, slice_mirror, tmp_path_factory) -> dict[str, Candidate]:
    """strong (2000 rows), weak (200 rows), untrained; each evaluated on the same 600-row test Parquet."""
    root = tmp_path_factory.mktemp("promote")
    parquet = {split: convert_to_parquet(slice_mirror / mnist_slice.split(split).path, root / f"{split}.parquet",
                                         bool(mnist_slice.header)) for split in ("train", "test")}
    out = {}
    for name, rows, seed in (("strong", 2000, 1), ("weak", 200, 2), ("untrained", 0, 3)):
        folder = root / name
        model = _fit(parquet["train"], folder / "model.keras", rows, seed)
        evaluate_model(model, parquet["test"], list(mnist_slice.class_names), folder)
        out[name] = Candidate(folder, model, folder / "metrics.json", parquet["test"], folder / "predictions.npy")
    accuracy = {name: read_metrics(c.metrics_path).test_accuracy for name, c in out.items()}
    assert accuracy["strong"] > accuracy["weak"] + 0.05 > accuracy["untrained"] + 0.1, accuracy
    return out
