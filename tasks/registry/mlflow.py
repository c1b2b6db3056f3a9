"""The MLflow registry: the Registry interface over an MLflow tracking server (``tasks.registry.mlflow_client``).

Production is the registered model's ``production`` alias; every run, published or not, is an MLflow
run, and those runs are the dataset's history (the MLflow UI charts them).
"""

from __future__ import annotations

import functools
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tasks import artifacts, storage
from tasks.conversion.parquet import load_xy
from tasks.model_io import score
from tasks.publishing.promote import PromotionDecision
from tasks.registry import mlflow_operations
from tasks.registry.interface import Candidate, Pin, Published, champion_fix_hint, scored_champion
from tasks.registry.lock import publish_lock, url_identity
from tasks.registry.mlflow_client import EXAMPLE_ROWS, PIN_TAG, MlflowServer, is_mlflow_uri
from tasks.registry.retention import RetentionPolicy
from tasks.results import Lineage, Metrics
from tasks.vocabulary import Outcome, Stage

__all__ = ["MlflowRegistry", "is_mlflow_uri"]


def _credentials_kept_out(method):
    """Run a registry method with MLflow's errors stripped of the tracking URI's credentials."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with self.mlflow.credentials_kept_out():
            return method(self, *args, **kwargs)
    return wrapped


class MlflowRegistry:
    """The Registry interface over ``tasks.registry.mlflow_client``: production is the registered model's alias."""

    def __init__(self, tracking_uri: str):
        self.mlflow = MlflowServer(tracking_uri)
        self.location = self.mlflow.shown  # credentials in the URI reach MLflow's client only

    def __repr__(self) -> str:
        return f"MlflowRegistry({self.location})"

    def lock(self, dataset: str):
        # Without a Prefect server the lock is a file on this machine, as for a folder registry.
        local = (Path(tempfile.gettempdir()) / "train-mnist-locks" /
                 f"{uuid.uuid5(uuid.NAMESPACE_URL, url_identity(self.location))}")
        return publish_lock(lambda: url_identity(self.location), dataset, local / dataset)

    @_credentials_kept_out
    def production(self, dataset: str) -> str | None:
        return self.mlflow.production(dataset)

    @_credentials_kept_out
    def champion_profile(self, dataset: str, dest_dir: Path) -> Path | None:
        """The data profile stored with the production version's run, downloaded into ``dest_dir``."""
        version = self.mlflow.production(dataset)
        return self.version_profile(dataset, version, dest_dir) if version else None

    @_credentials_kept_out
    def version_profile(self, dataset: str, version: str, dest_dir: Path) -> Path | None:
        """The data profile stored with a version's run, downloaded into ``dest_dir``, if it has one."""
        return self.mlflow.download_run_artifact(dataset, version, artifacts.PROFILE_FILE, dest_dir / "champion")

    @_credentials_kept_out
    def load_version(self, dataset: str, version: str) -> tuple[str, Any]:
        return self.mlflow.model_uri(dataset, version), self.mlflow.load_model(dataset, version)

    @_credentials_kept_out
    def canary_batch(self, dataset: str, version: str, dest_dir: Path) -> Path | None:
        """The ``canary.npz`` logged with the version's run, downloaded into ``dest_dir``, if it has one."""
        return self.mlflow.download_run_artifact(dataset, version, artifacts.CANARY_FILE, dest_dir)

    def champion_predictions(self, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray:
        uri = self.mlflow.model_uri(dataset, champion)
        fix = champion_fix_hint(f"the {dataset!r} model's alias in {self.location}")
        def predict(x: np.ndarray) -> np.ndarray:
            with self.mlflow.credentials_kept_out():
                return score(self.mlflow.load_model(dataset, champion), x).argmax(axis=1)

        return scored_champion(dataset, champion, uri, pixels, predict, fix)

    @_credentials_kept_out
    def publish(self, candidate: Candidate, promotion: PromotionDecision, documents: dict[str, bytes]) -> Published:
        record = self._record(candidate, promotion, "published", "gates and champion comparison passed", documents,
                              promote=True, compared=promotion.champion_version)
        return Published(candidate.dataset, candidate.version, None, promotion, location=record.run_url,
                         registry_version=record.model_version)

    @_credentials_kept_out
    def record_unpublished(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
                           reason: str, documents: dict[str, bytes]) -> str | None:
        return self._record(candidate, promotion, decision, reason, documents, promote=False).run_url

    def record_history(self, candidate: Candidate, outcome: Outcome, seconds: float, reason: str | None = None,
                       stage: Stage | None = None, published: Published | None = None) -> None:
        """The experiment's MLflow runs are the history (the MLflow UI charts them across runs)."""

    @_credentials_kept_out
    def record_failure(self, dataset: str, version: str, stage: Stage, reason: str,
                       validation_report: Path | None = None, drift: dict[str, float] | None = None) -> None:
        """A run that stopped before training: an MLflow run with nothing but why (no model, no metrics)."""
        self.mlflow.record_failure(dataset, version, stage, reason,
                                   {artifacts.VALIDATION_JSON: validation_report} if validation_report else {})

    @_credentials_kept_out
    def has_version(self, dataset: str, version: str) -> bool:
        return mlflow_operations.has_version(self.mlflow, dataset, version)

    @_credentials_kept_out
    def production_history(self, dataset: str) -> list[str]:
        return mlflow_operations.production_history(self.mlflow, dataset)

    @_credentials_kept_out
    def move_production(self, dataset: str, version: str, compared: str | None) -> None:
        mlflow_operations.move_alias(self.mlflow, dataset, version, compared)

    @_credentials_kept_out
    def pin(self, dataset: str) -> Pin | None:
        text = mlflow_operations.registered_model_tag(self.mlflow, dataset, PIN_TAG)
        return Pin.model_validate_json(text) if text else None

    @_credentials_kept_out
    def set_pin(self, dataset: str, pin: Pin | None) -> None:
        mlflow_operations.set_registered_model_tag(self.mlflow, dataset, PIN_TAG, pin.model_dump_json() if pin else None)

    @_credentials_kept_out
    def record_operation(self, dataset: str, outcome: Outcome, version: str, from_version: str | None,
                         reason: str | None, requested_by: str) -> None:
        mlflow_operations.record_operation(self.mlflow, dataset, str(outcome), version, from_version, reason or "", requested_by)

    def prune(self, dataset: str, protected: set[str | None], policy: RetentionPolicy | None = None) -> None:
        """Registered versions are MLflow's to keep; nothing is deleted from the server."""

    def _record(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str, reason: str,
                documents: dict[str, bytes], promote: bool, compared: str | None = None):
        with tempfile.TemporaryDirectory() as tmp:
            paths = dict(candidate.files)
            for name, data in documents.items():
                paths[name] = storage.write_bytes(Path(tmp) / name, data)
            example = None
            if candidate.decision.passed:
                pixels, _ = load_xy(candidate.test_parquet)
                example = pixels[:EXAMPLE_ROWS]
            return self.mlflow.record_run(
                candidate.dataset, candidate.version, params=candidate.parameters, datasets=candidate.lineage.data,
                example=example,
                metrics=mlflow_metrics(candidate.metrics, promotion), tags=lineage_tags(candidate.lineage),
                artifacts=paths, decision=decision, reason=reason,
                # A model that failed its gates is not a version anyone should load; the run keeps its numbers.
                model_path=candidate.model_path if candidate.decision.passed else None, promote=promote,
                compared=compared)


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


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    """``data.<split>.location`` / ``.sha256`` / ``.rows`` tags: which bytes the model was trained and tested on."""
    tags = {}
    for split, info in lineage.data.items():
        for key, value in info.as_document().items():
            if value is not None:
                tags[f"data.{split}.{key}"] = str(value)
    return tags
