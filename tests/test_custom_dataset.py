"""A user-described MNIST-like dataset (no pins, no reference, layout auto-detected) runs end to end."""

import json

import pytest

from flows.train import train_mnist
from tasks.registry.folder import read_production
from tasks.storage import sha256_file


@pytest.mark.slow
def test_user_dataset_from_a_datasets_file_is_trained_and_published_with_lineage(prefect_api, slice_mirror, http_mirror,
                                                                              tmp_path):
    datasets_file = tmp_path / "my-datasets.toml"
    datasets_file.write_text("""
[[dataset]]
name = "my-fashion"
class_names = ["top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
train = { path = "fashion-mnist/fashion-mnist_train.csv.gz" }
test = { path = "fashion-mnist/fashion-mnist_test.csv.gz" }
gates = { min_accuracy = 0.5 }
""")
    source = http_mirror(slice_mirror)
    registry = tmp_path / "registry"
    versions = train_mnist(dataset="my-fashion", datasets_file=str(datasets_file), source=source, epochs=2,
                           registry=str(registry), data_dir=str(tmp_path / "data"))
    version = versions["my-fashion"]
    assert read_production(registry, "my-fashion") == version
    metrics = json.loads((registry / "my-fashion" / version / "metrics.json").read_text())
    train_sha = sha256_file(slice_mirror / "fashion-mnist/fashion-mnist_train.csv.gz")
    assert metrics["data"]["train"]["sha256"] == train_sha  # recorded for lineage, though nothing was pinned
    assert metrics["data"]["train"]["location"].startswith("http://127.0.0.1:")
    assert train_sha in (registry / "my-fashion" / version / "model_card.md").read_text()
    report = json.loads((tmp_path / "data" / "runs" / "my-fashion" / version / "validation.json").read_text())
    computed = report["drift"]["reference_computed_from_train"]
    assert sum(computed["class_counts"]) == 3000 and 60 < computed["pixel_mean"] < 90
