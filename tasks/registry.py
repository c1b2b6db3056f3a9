"""Where published models live: one interface, two implementations (a folder, an MLflow server).

``open_registry(location)`` picks the implementation: an ``http(s)://`` URL is an MLflow tracking server
(``tasks.registry_mlflow``), anything else a folder. The folder registry's layout::

    <registry>/<dataset>/<version>/{model.keras, metrics.json, confusion_matrix.csv,
                                    confusion_matrix.png, training_curves.png, model_card.md, ...}
    <registry>/<dataset>/production      # the current version's name

A folder version is assembled in a hidden staging folder, fsynced and renamed into place whole; the
pointer is then replaced atomically. ``tasks.publish`` holds the decision logic shared by both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks import history, storage
from tasks.evaluate import Metrics
from tasks.gate import GateDecision
from tasks.model_io import load_model, predict_classes
from tasks.promote import PromotionDecision
from tasks.publish_lock import publish_lock
from tasks.registry_mlflow import MlflowRegistry, is_mlflow_uri
from tasks.retention import RetentionPolicy, prune_versions

POINTER = "production"
PROFILE_FILE = "data_profile.json"  # the data profile validation wrote, stored with the version
STAGING_PREFIX = ".staging-"
VERSION_FILES = ("model.keras", "metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "model_card.md",
                 "canary.npz")


class ChampionUnreadable(RuntimeError):
    """The production model cannot be loaded or scored, so no challenger can be compared with it."""


@dataclass(frozen=True)
class Candidate:
    """One trained and evaluated model on its way to the registry: everything publishing needs, typed."""

    dataset: str
    version: str
    model_path: Path
    metrics: Metrics
    decision: GateDecision
    lineage: dict[str, Any]
    test_parquet: Path
    predictions_path: Path
    files: dict[str, Path] = field(default_factory=dict)  # stored with the version: curves, reports, profile
    parameters: dict[str, Any] = field(default_factory=dict)  # recipe and run parameters


@dataclass(frozen=True)
class Published:
    dataset: str
    version: str
    path: Path | None  # the version's folder (folder registry)
    promotion: PromotionDecision
    location: str = ""  # where a user finds it: the folder, or the MLflow run's URL
    registry_version: str | None = None  # MLflow's registered model version


class Registry(Protocol):
    """What publishing needs from a registry. ``tasks.publish`` calls these under ``lock``."""

    location: str

    def lock(self, dataset: str) -> contextlib.AbstractContextManager[str]: ...

    def production(self, dataset: str) -> str | None: ...

    def champion_profile(self, dataset: str) -> Path | None: ...

    def load_version(self, dataset: str, version: str) -> tuple[str, Any]: ...

    def champion_predictions(self, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray: ...

    def publish(self, candidate: Candidate, promotion: PromotionDecision, documents: dict[str, bytes]) -> Published: ...

    def record_unpublished(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
                           reason: str, documents: dict[str, bytes]) -> str | None: ...

    def record_history(self, candidate: Candidate, outcome: str, seconds: float, reason: str | None = None,
                       published: Published | None = None) -> None: ...

    def record_failure(self, dataset: str, version: str, stage: str, reason: str,
                       validation_report: Path | None = None) -> None: ...

    def prune(self, dataset: str, protected: set[str | None], policy: RetentionPolicy | None = None) -> None: ...


def open_registry(location: str | Path) -> Registry:
    """The registry at ``location``: an MLflow tracking server for an http(s) URL, else a folder."""
    location = str(location)
    if is_mlflow_uri(location):
        return MlflowModelRegistry(location)
    return FolderRegistry(Path(location))


def champion_fix_hint(where: str) -> str:
    return f"; nothing was published. Restore it, or point {where} at a readable version"


def scored_champion(dataset: str, champion: str, what: str, pixels: np.ndarray, predict, fix: str) -> np.ndarray:
    """``predict(pixels)`` of the champion, or ChampionUnreadable naming ``what`` if it cannot be run."""
    try:
        predictions = predict(pixels)
    except ChampionUnreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load or run it means the same: no comparison
        raise ChampionUnreadable(f"{dataset}: champion {champion}'s model {what} cannot be loaded or scored "
                                 f"({type(exc).__name__}: {exc}){fix}") from exc
    if np.shape(predictions) != (len(pixels),):
        raise ChampionUnreadable(f"{dataset}: champion {champion}'s model {what} gave {np.shape(predictions)} "
                                 f"predictions for {len(pixels)} test rows{fix}")
    return predictions


# ---- the folder registry -------------------------------------------------------------------------


def read_production(registry: Path, dataset: str) -> str | None:
    """The production version's name; None only when there is no pointer at all.

    A pointer that is empty, is not a regular file, or names a version that is not a folder of the
    registry raises ``ChampionUnreadable`` naming the file: damage must not read as "no champion".
    """
    registry = Path(registry)
    pointer = registry / dataset / POINTER
    if not os.path.lexists(pointer):
        return None
    fix = "; nothing was published. Repair it, or remove it to publish the next model on its gates alone"
    if not pointer.is_file():
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} is not a regular file{fix}")
    try:
        version = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} cannot be read ({exc}){fix}") from exc
    if not version:
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} is empty{fix}")
    if "/" in version or version.startswith(".") or not (registry / dataset / version).is_dir():
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} names version {version!r}, "
                                 f"which is not a folder of {registry / dataset}{fix}")
    return version


def list_versions(registry: Path, dataset: str) -> list[str]:
    root = Path(registry) / dataset
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != POINTER)


def is_complete_version(path: Path) -> bool:
    return all((path / name).is_file() for name in VERSION_FILES)


def set_production(registry: Path, dataset: str, version: str) -> None:
    """Point production at ``version`` with one atomic rename."""
    storage.write_text(Path(registry) / dataset / POINTER, f"{version}\n")


def remove_stale_staging(registry: Path, dataset: str) -> None:
    """Staging folders and temporaries left by a killed publisher are never visible; clear them (under the lock)."""
    root = Path(registry) / dataset
    for stale in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    storage.remove_stale_temporaries(root)


@contextlib.contextmanager
def dataset_lock(registry: Path, dataset: str) -> Iterator[str]:
    """The publish lock of one dataset of a folder registry (server-wide when a Prefect server is configured)."""
    with publish_lock(str(Path(registry).resolve()), dataset, Path(registry) / dataset) as how:
        yield how


class FolderRegistry:
    """Versions as folders, production as a one-line pointer file; the embedded default."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def __repr__(self) -> str:
        return f"FolderRegistry({self.root})"

    def lock(self, dataset: str):
        return dataset_lock(self.root, dataset)

    def production(self, dataset: str) -> str | None:
        return read_production(self.root, dataset)

    def champion_profile(self, dataset: str) -> Path | None:
        """The production version's stored data profile, if there is a production version with one."""
        version = read_production(self.root, dataset)
        path = self.root / dataset / version / PROFILE_FILE if version else None
        return path if path is not None and path.is_file() else None

    def load_version(self, dataset: str, version: str) -> tuple[str, Any]:
        """(model file, loaded Keras model) of a version; FileNotFoundError naming the file if it is gone."""
        path = self.root / dataset / version / "model.keras"
        if not path.is_file():
            raise FileNotFoundError(f"{dataset}: version {version}'s model file {path} does not exist")
        return str(path), load_model(path)

    def champion_predictions(self, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray:
        model_path = self.root / dataset / champion / "model.keras"
        fix = champion_fix_hint(str(self.root / dataset / POINTER))
        if not model_path.is_file():
            raise ChampionUnreadable(f"{dataset}: champion {champion}'s model file {model_path} is missing{fix}")
        return scored_champion(dataset, champion, f"file {model_path}", pixels,
                               lambda x: predict_classes(model_path, x), fix)

    def publish(self, candidate: Candidate, promotion: PromotionDecision, documents: dict[str, bytes]) -> Published:
        """Write the complete version folder, then move the pointer to it (caller holds the lock)."""
        remove_stale_staging(self.root, candidate.dataset)
        root = self.root / candidate.dataset
        final = root / candidate.version
        if final.exists():
            raise FileExistsError(f"{final} already exists; versions are never overwritten")
        staging = root / f"{STAGING_PREFIX}{candidate.version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        storage.copy_file(candidate.model_path, staging / "model.keras")
        for name, src in candidate.files.items():
            if Path(src).is_file():
                storage.copy_file(src, staging / name)
        for name, data in documents.items():
            storage.write_bytes(staging / name, data)
        storage.fsync_dir(staging)
        first = not list_versions(self.root, candidate.dataset)
        staging.rename(final)
        storage.fsync_dir(root)
        if first:  # the dataset folder's own entry in the registry must survive a power cut too
            storage.fsync_dir(self.root)
        set_production(self.root, candidate.dataset, candidate.version)
        return Published(candidate.dataset, candidate.version, final, promotion, location=str(final))

    def record_unpublished(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
                           reason: str, documents: dict[str, bytes]) -> str | None:
        """The folder registry keeps published versions only; the run's folder holds the rest."""
        return None

    def record_history(self, candidate: Candidate, outcome: str, seconds: float, reason: str | None = None,
                       published: Published | None = None) -> None:
        """One line in ``<dataset>/history.jsonl`` and a fresh trend plot (``tasks.history``), under the lock."""
        with self.lock(candidate.dataset):
            history.record_run(self.root, candidate.dataset, candidate.version, outcome, candidate.metrics,
                               candidate.decision, candidate.lineage, seconds, reason=reason,
                               metrics_doc=published.path / "metrics.json" if published and published.path else None)

    def record_failure(self, dataset: str, version: str, stage: str, reason: str,
                       validation_report: Path | None = None) -> None:
        """A run that stopped before training (download, validation): its line in the history, under the lock."""
        with self.lock(dataset):
            history.record_run(self.root, dataset, version, "failed", reason=reason, stage=stage,
                               lineage={"validation_report": str(validation_report) if validation_report else None})

    def prune(self, dataset: str, protected: set[str | None], policy: RetentionPolicy | None = None) -> None:
        """Retention after a publish: never the production version, nor any of ``protected``."""
        with self.lock(dataset):
            prune_versions(self.root, dataset, list_versions(self.root, dataset),
                           {read_production(self.root, dataset), *protected} - {None}, policy)


# ---- the MLflow registry -------------------------------------------------------------------------


class MlflowModelRegistry:
    """The Registry interface over ``tasks.registry_mlflow``: production is the registered model's alias."""

    def __init__(self, tracking_uri: str):
        self.mlflow = MlflowRegistry(tracking_uri)
        self.location = self.mlflow.tracking_uri

    def __repr__(self) -> str:
        return f"MlflowModelRegistry({self.location})"

    def lock(self, dataset: str):
        # Without a Prefect server the lock is a file on this machine, as for a folder registry.
        local = Path(tempfile.gettempdir()) / "train-mnist-locks" / f"{uuid.uuid5(uuid.NAMESPACE_URL, self.location)}"
        return publish_lock(self.location, dataset, local / dataset)

    def production(self, dataset: str) -> str | None:
        return self.mlflow.production(dataset)

    def champion_profile(self, dataset: str) -> Path | None:
        """The data profile stored with the production version's run, downloaded to a temporary file."""
        version = self.mlflow.production(dataset)
        return self.mlflow.download_profile(dataset, version) if version else None

    def load_version(self, dataset: str, version: str) -> tuple[str, Any]:
        return self.mlflow.model_uri(dataset, version), self.mlflow.load_model(dataset, version)

    def champion_predictions(self, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray:
        uri = self.mlflow.model_uri(dataset, champion)
        fix = champion_fix_hint(f"the {dataset!r} model's alias in {self.location}")
        return scored_champion(dataset, champion, uri, pixels,
                               lambda x: self.mlflow.load_model(dataset, champion).predict(
                                   np.asarray(x, np.float32), batch_size=2048, verbose=0).argmax(axis=1), fix)

    def publish(self, candidate: Candidate, promotion: PromotionDecision, documents: dict[str, bytes]) -> Published:
        record = self._record(candidate, promotion, "published", "gates and champion comparison passed", documents,
                              promote=True)
        return Published(candidate.dataset, candidate.version, None, promotion, location=record.run_url,
                         registry_version=record.model_version)

    def record_unpublished(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
                           reason: str, documents: dict[str, bytes]) -> str | None:
        return self._record(candidate, promotion, decision, reason, documents, promote=False).run_url

    def record_history(self, candidate: Candidate, outcome: str, seconds: float, reason: str | None = None,
                       published: Published | None = None) -> None:
        """The experiment's MLflow runs are the history (the MLflow UI charts them across runs)."""

    def record_failure(self, dataset: str, version: str, stage: str, reason: str,
                       validation_report: Path | None = None) -> None:
        """A run that stopped before training: an MLflow run with nothing but why (no model, no metrics)."""
        self.mlflow.record_failure(dataset, version, stage, reason,
                                   {"validation.json": validation_report} if validation_report else {})

    def prune(self, dataset: str, protected: set[str | None], policy: RetentionPolicy | None = None) -> None:
        """Registered versions are MLflow's to keep; nothing is deleted from the server."""

    def _record(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str, reason: str,
                documents: dict[str, bytes], promote: bool):
        with tempfile.TemporaryDirectory() as tmp:
            paths = dict(candidate.files)
            for name, data in documents.items():
                paths[name] = storage.write_bytes(Path(tmp) / name, data)
            return self.mlflow.record_run(
                candidate.dataset, candidate.version, params=candidate.parameters,
                metrics=mlflow_metrics(candidate.metrics, promotion), tags=lineage_tags(candidate.lineage),
                artifacts=paths, decision=decision, reason=reason,
                # A model that failed its gates is not a version anyone should load; the run keeps its numbers.
                model_path=candidate.model_path if candidate.decision.passed else None, promote=promote)


def mlflow_metrics(metrics: Metrics, promotion: PromotionDecision | None) -> dict[str, float]:
    values: dict[str, float] = {"test_accuracy": metrics.test_accuracy, "test_loss": metrics.test_loss}
    values.update({f"precision_{name}": v for name, v in metrics.precision.items()})
    values.update({f"recall_{name}": v for name, v in metrics.recall.items()})
    if promotion is not None:
        values.update({
            "challenger_accuracy": promotion.challenger_accuracy,
            "champion_accuracy": promotion.champion_accuracy,
            "discordant_challenger_only_right": promotion.challenger_only_right,
            "discordant_champion_only_right": promotion.champion_only_right,
            "mcnemar_p_value": promotion.p_value,
            "promoted": float(promotion.promoted),
        })
    return {k: v for k, v in values.items() if v is not None}


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """``data.<split>.location`` / ``.sha256`` / ``.rows`` tags: which bytes the model was trained and tested on."""
    tags = {}
    for split, info in lineage.get("data", {}).items():
        for key, value in info.items():
            if value is not None:
                tags[f"data.{split}.{key}"] = str(value)
    return tags
