"""What an MLflow run records about its inputs: each data split as a dataset input (the UI's "Datasets used"),
and a request example beside the registered model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from tasks.datasets import NUM_PIXELS
from tasks.results import DataLineage

MAX_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest
CONTEXTS = {"train": "training", "test": "testing"}  # MLflow's words for what a dataset input was used for
EXAMPLE_FILE = "serving_input_example.json"


def log_datasets(client, run_id: str, dataset: str, splits: dict[str, DataLineage]) -> None:
    """Each split as an MLflow dataset input (the UI's "Datasets used"): its source, a digest (the first
    36 hex digits of its SHA-256, MLflow's limit; the whole hash in the ``sha256`` tag), rows and schema."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, NUM_PIXELS), "pixels"),
                     TensorSpec(np.dtype(np.uint8), (-1,), "label")])
    inputs = []
    for split, info in splits.items():
        try:
            source = resolve_dataset_source(info.location)
        except Exception:  # noqa: BLE001 - a location MLflow has no source type for is still named
            source = HTTPDatasetSource(info.location)
        data = MetaDataset(source, name=f"{dataset}-{split}", digest=info.sha256[:MAX_DIGEST_CHARS], schema=schema)
        tags = {"mlflow.data.context": CONTEXTS.get(split, split), "sha256": info.sha256,
                "rows": str(info.rows or ""), "bytes": str(info.bytes)}
        inputs.append(DatasetInput(data._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()]))
    client.log_inputs(run_id, datasets=inputs)


def log_example(client, run_id: str, example: np.ndarray) -> None:
    """A request ``mlflow models serve`` accepts for this model (``serving_input_example.json``, at the top of
    the run): MLflow 3's Keras flavour writes an ``input_example`` before it creates the model's folder and
    fails, so the example is kept beside the model rather than inside it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / EXAMPLE_FILE
        path.write_text(json.dumps({"inputs": np.asarray(example, np.uint8).tolist()}))
        client.log_artifact(run_id, str(path))
