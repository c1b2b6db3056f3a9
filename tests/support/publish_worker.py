"""Test helpers for publishing: small consistent candidates, a publishing worker process, registry checks.

The worker runs in a ``forkserver`` child (tasks.publishing.publish is imported once, in the server), so a test
can start and SIGKILL dozens of publishers in seconds. It wraps the publish steps to log each one and
sleep a little (widening the windows a kill can land in), and replaces the champion's Keras scoring
with the candidate's own predictions: the candidate's model file is a few dummy bytes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.conversion.parquet import SCHEMA
from tasks.evaluation.evaluate import compute_metrics
from tasks.orchestration.versions import new_version_name
from tasks.publishing import publish
from tasks.publishing.canary import LATENCY_BUDGET_S, CanaryResult
from tasks.publishing.publish import publish_version
from tasks.registry import FolderRegistry
from tasks.registry import folder as registry_module
from tasks.registry.folder import POINTER, STAGING_PREFIX, is_complete_version, list_versions, read_production
from tasks.results import GateDecision, Lineage, Metrics

CLASS_NAMES = [f"class-{i}" for i in range(10)]
DUMMY_MODEL = b"not a real keras model, just bytes that must arrive whole\n" * 64
PASSED = GateDecision(passed=True, reasons=["PASS min_accuracy: test_accuracy 0.8000 >= threshold 0.5000"])
LINEAGE = Lineage.model_validate({
    "data": {"train": {"location": "mirror/train.csv.gz", "sha256": "a" * 64, "bytes": 1},
             "test": {"location": "mirror/test.csv.gz", "sha256": "b" * 64, "bytes": 1}},
    "parameters": {"dataset": "kill-test", "model": "mlp", "epochs": 1, "seed": 42},
})


@dataclass(frozen=True)
class Candidate:
    """Everything publish_version needs about one trained model, consistent with itself."""

    folder: Path
    model_path: Path
    metrics_path: Path
    test_parquet: Path
    predictions_path: Path

    @property
    def metrics(self) -> Metrics:
        return Metrics.model_validate_json(self.metrics_path.read_text())


def write_test_parquet(labels: np.ndarray, dest: Path) -> Path:
    """A test split in the real schema (label + 784 pixel columns, all pixels 0)."""
    columns = [pa.array(labels.astype(np.uint8))] + [pa.array(np.zeros(len(labels), np.uint8))] * (len(SCHEMA) - 1)
    pq.write_table(pa.Table.from_arrays(columns, schema=SCHEMA), dest)
    return dest


def make_candidate(folder: Path, labels: np.ndarray, predictions: np.ndarray, model_bytes: bytes = DUMMY_MODEL,
                   test_parquet: Path | None = None) -> Candidate:
    """Write model.keras, predictions.npy and matching metrics.json (and the test Parquet unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.keras").write_bytes(model_bytes)
    np.save(folder / "predictions.npy", predictions.astype(np.int16))
    metrics = compute_metrics(labels, np.eye(len(CLASS_NAMES))[predictions], CLASS_NAMES)
    (folder / "metrics.json").write_text(metrics.model_dump_json(indent=2))
    parquet = test_parquet or write_test_parquet(labels, folder / "test.parquet")
    return Candidate(folder, folder / "model.keras", folder / "metrics.json", parquet, folder / "predictions.npy")


def dummy_candidate(folder: Path, rows: int = 80, seed: int = 0) -> Candidate:
    """Labels with every class present; predictions right on about 80 % of the rows."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % len(CLASS_NAMES)
    predictions = np.where(rng.random(rows) < 0.8, labels, (labels + 1) % len(CLASS_NAMES))
    return make_candidate(folder, labels, predictions)


def registry_candidate(dataset: str, candidate: Candidate, version: str | None = None,
                       decision: GateDecision = PASSED, files: dict[str, Path] | None = None) -> registry_module.Candidate:
    return registry_module.Candidate(dataset=dataset, version=version or new_version_name(), model_path=candidate.model_path,
                              metrics=candidate.metrics, decision=decision, lineage=LINEAGE,
                              test_parquet=candidate.test_parquet,
                              predictions=np.load(candidate.predictions_path), files=files or {},
                              parameters=LINEAGE.parameters)


def publish_model(registry_dir: Path, dataset: str, version: str, model_path: Path, metrics: Metrics,
                  decision: GateDecision, lineage: Lineage | dict, *, test_parquet: Path, predictions_path: Path,
                  files: dict[str, Path] | None = None, probabilities_path: Path | None = None,
                  drift: dict[str, float] | None = None, **kwargs) -> registry_module.Published:
    """Publish a real model file to a folder registry, as the flow's publish task does."""
    lineage = Lineage.model_validate(lineage)
    candidate = registry_module.Candidate(dataset=dataset, version=version, model_path=model_path, metrics=metrics,
                                          decision=decision, lineage=lineage, test_parquet=test_parquet,
                                          predictions=np.load(predictions_path), files=files or {},
                                          parameters=lineage.parameters,
                                          probabilities=np.load(probabilities_path) if probabilities_path else None,
                                          drift=drift or {})
    return publish_version(FolderRegistry(registry_dir), candidate, **kwargs)


def publish_candidate(registry_dir: Path, dataset: str, candidate: Candidate, version: str | None = None,
                      decision: GateDecision = PASSED, files: dict[str, Path] | None = None,
                      **kwargs) -> registry_module.Published:
    return publish_version(FolderRegistry(registry_dir),
                           registry_candidate(dataset, candidate, version, decision, files), **kwargs)


def _png(width: int, height: int) -> bytes:
    """A valid all-black greyscale PNG, built by hand (no plotting)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# Rendering the heatmap takes ~1 s on a busy machine and is tested on its own; the kill and
# concurrency tests are about what publishing leaves on disk, so they write this small PNG instead.
TINY_PNG = _png(4, 4)


def fast_png(metrics: Metrics, title: str) -> bytes:
    return TINY_PNG


def fake_champion_scoring(candidate: Candidate):
    """Stands in for loading a Keras champion: it predicts exactly what the candidate predicts (a tie)."""
    predictions = np.load(candidate.predictions_path)

    def predict_classes(model_path: Path, pixels: np.ndarray) -> np.ndarray:
        return predictions

    return predict_classes


def stand_in_canary(model_path: Path, batch_path: Path, *args, **kwargs) -> CanaryResult:
    """Stands in for the fresh-process canary, which cannot load the dummy model bytes: a pass, timed at zero."""
    return CanaryResult(passed=True, loaded=True, matched=True, rows=0, load_s=0.0, first_batch_s=0.0, latency_s=0.0,
                        latency_budget_s=LATENCY_BUDGET_S, reasons=["PASS stand-in for the dummy model bytes"])


def assert_registry_consistent(registry: Path, dataset: str, model_bytes: bytes = DUMMY_MODEL) -> list[str]:
    """Every visible version is whole; the pointer, if any, names one of them. Returns the versions."""
    versions = list_versions(registry, dataset)
    for version in versions:
        folder = registry / dataset / version
        assert is_complete_version(folder), f"{folder} is visible but incomplete: {sorted(os.listdir(folder))}"
        doc = json.loads((folder / "metrics.json").read_text())
        assert doc["version"] == version and doc["promotion"]["promoted"] is True
        assert (folder / "model.keras").read_bytes() == model_bytes, f"{folder}/model.keras is torn"
        assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        card = (folder / "model_card.md").read_text()
        assert card.startswith(f"# {dataset} model {version}\n") and card.endswith("\n")
        assert "## Champion comparison" in card
    if (registry / dataset / POINTER).exists():
        production = read_production(registry, dataset)
        assert production in versions, f"production pointer names {production!r}, not a visible version"
    return versions


def leftovers(registry: Path, dataset: str) -> list[str]:
    """Staging folders and temporary pointer files that only a killed publisher leaves behind."""
    root = registry / dataset
    return sorted(p.name for p in [*root.glob(f"{STAGING_PREFIX}*"), *root.glob(f".{POINTER}.*.tmp")])


# ---- the worker process ----------------------------------------------------------------------------


def forkserver_context() -> multiprocessing.context.BaseContext:
    """Children forked from a clean server that has already imported this module (and so tasks.publishing.publish)."""
    # Python 3.11's fork server ignores the parent's sys.path when preloading (the import error is
    # swallowed and every child would import TensorFlow-free but still slow modules itself), so hand
    # it the project root through the environment it starts with.
    root = Path(__file__).resolve().parents[2]
    paths = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ctx = multiprocessing.get_context("forkserver")
    # "__main__": else each child imports the main module (pytest) again; pyarrow.dataset: read_table's lazy import.
    ctx.set_forkserver_preload(["__main__", __name__, "pyarrow.dataset"])
    return ctx


def _log(fd: int, line: str) -> None:
    os.write(fd, f"{os.getpid()} {line}\n".encode())  # one O_APPEND write per line: lines never interleave


def _install_hooks(log_fd: int, delay: float, current: dict[str, str]) -> None:
    """Log every publish step and sleep ``delay`` before it; log asking for, entering and leaving the lock."""

    def step(name: str, func):
        def wrapped(*args, **kwargs):
            _log(log_fd, f"{name} {current['version']}")
            time.sleep(delay)
            return func(*args, **kwargs)
        return wrapped

    original_write, original_copy = storage.write_bytes, storage.copy_file
    original_set, original_clean = registry_module.set_production, registry_module.remove_stale_staging
    original_lock = registry_module.dataset_lock
    storage.write_bytes = lambda path, data: step(
        "write:pointer" if path.name == POINTER else f"write:{path.name}", original_write)(path, data)
    storage.copy_file = lambda src, dest: step(f"copy:{dest.name}", original_copy)(src, dest)
    storage.fsync_dir = step("fsync-dir", storage.fsync_dir)

    @contextlib.contextmanager
    def dataset_lock(registry_dir, dataset):  # every hold of the lock: publishing, history, pruning
        _log(log_fd, f"want {current['version']}")
        with original_lock(registry_dir, dataset) as how:
            _log(log_fd, f"enter {current['version']}")
            try:
                yield how
            finally:
                _log(log_fd, f"release {current['version']}")

    def remove_stale_staging(registry_dir, dataset):  # the first thing publishing does holding the lock
        return step("clean", original_clean)(registry_dir, dataset)

    def set_production(registry_dir, dataset, version):  # the last thing publishing does holding the lock
        step("pointer", original_set)(registry_dir, dataset, version)
        _log(log_fd, f"exit {version}")

    registry_module.dataset_lock = dataset_lock
    registry_module.remove_stale_staging = remove_stale_staging
    registry_module.set_production = set_production


def publish_loop(registry: str, dataset: str, candidate: Candidate, step_log: str, delay: float,
                 count: int | None = None, start=None, api_url: str | None = None) -> None:
    """Publish ``count`` new versions (forever if None), logging each step to ``step_log``; with ``api_url``, as a
    run reporting to that Prefect server does (its publish lock includes the server's concurrency limit)."""
    if api_url is not None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}):
            return publish_loop(registry, dataset, candidate, step_log, delay, count, start)
    # A killed publisher cannot remove its temporary folder: keep it beside the step log, in the test's tmp_path.
    tempfile.tempdir = str(Path(step_log).parent)
    current = {"version": "-"}
    log_fd = os.open(step_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _install_hooks(log_fd, delay, current)
    registry_module.predict_classes = fake_champion_scoring(candidate)
    publish.confusion_matrix_png = fast_png
    publish.run_canary = stand_in_canary
    if start is not None:
        start.wait(30)
    published = 0
    while count is None or published < count:
        current["version"] = new_version_name()
        publish_candidate(Path(registry), dataset, candidate, current["version"])
        published += 1
