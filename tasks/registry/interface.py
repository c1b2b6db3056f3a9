"""What publishing needs from a registry, and the values that go in and come out of one.

Two implementations: ``tasks.registry.folder`` (versions as folders, the default) and
``tasks.registry.mlflow`` (an MLflow tracking server). ``tasks.registry.open_registry`` picks one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from tasks.publishing.canary import CanaryResult
from tasks.publishing.promote import PromotionDecision
from tasks.registry.retention import RetentionPolicy
from tasks.results import GateDecision, Lineage, Metrics
from tasks.vocabulary import Outcome, Stage, StageFailure


class ChampionUnreadable(StageFailure, RuntimeError):
    """The production model cannot be loaded or scored, so no challenger can be compared with it."""
    stage = Stage.CHAMPION


class PublishConflict(StageFailure, RuntimeError):
    """Production moved while this run published (its lock lapsed): the fence refused to move it again."""
    stage = Stage.PUBLISH


def check_fence(dataset: str, version: str, compared: str | None, current: str | None, where: str) -> None:
    """Compare-and-swap's compare: production must still name the champion ``version`` was compared against."""
    if current != compared:
        raise PublishConflict(
            f"{dataset}: {version} not published: production ({where}) moved from {compared or 'nothing'} to "
            f"{current or 'nothing'} after this run compared against it; another run published meanwhile (this "
            "run's lock had lapsed, e.g. while it was paused), so this comparison is stale and production was left "
            "as the other run set it")


@dataclass(frozen=True)
class Candidate:
    """One trained and evaluated model on its way to the registry: everything publishing needs, typed."""

    dataset: str
    version: str
    model_path: Path
    metrics: Metrics
    decision: GateDecision
    lineage: Lineage
    test_parquet: Path
    predictions: np.ndarray  # evaluation's predicted class of every row of ``test_parquet``
    files: dict[str, Path] = field(default_factory=dict)  # stored with the version: curves, reports, profile
    probabilities: np.ndarray | None = None  # evaluation's probabilities: the canary compares them too
    parameters: dict[str, Any] = field(default_factory=dict)  # recipe and run parameters
    drift: dict[str, float] = field(default_factory=dict)  # validation's drift numbers, for the run log


class Pin(BaseModel):
    """Production frozen at ``version`` by an operator: nightly runs train and record, but never move it."""

    version: str
    reason: str
    by: str
    at: str


@dataclass(frozen=True)
class Published:
    dataset: str
    version: str
    path: Path | None  # the version's folder (folder registry)
    promotion: PromotionDecision
    location: str = ""  # where a user finds it: the folder, or the MLflow run's URL
    registry_version: str | None = None  # MLflow's registered model version
    canary: CanaryResult | None = None  # the canary it passed before production moved


class Registry(Protocol):
    """What publishing needs from a registry. ``tasks.publishing.publish`` calls these under ``lock``."""

    location: str

    def lock(self, dataset: str) -> contextlib.AbstractContextManager[str]: ...

    def production(self, dataset: str) -> str | None: ...

    def champion_profile(self, dataset: str, dest_dir: Path) -> Path | None: ...

    def version_profile(self, dataset: str, version: str, dest_dir: Path) -> Path | None: ...

    def load_version(self, dataset: str, version: str) -> tuple[str, Any]: ...

    def canary_batch(self, dataset: str, version: str, dest_dir: Path) -> Path | None: ...

    def champion_predictions(self, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray: ...

    def publish(self, candidate: Candidate, promotion: PromotionDecision, documents: dict[str, bytes]) -> Published: ...

    def record_unpublished(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
                           reason: str, documents: dict[str, bytes]) -> str | None: ...

    def record_history(self, candidate: Candidate, outcome: Outcome, seconds: float, reason: str | None = None,
                       stage: Stage | None = None, published: Published | None = None) -> None: ...

    def record_failure(self, dataset: str, version: str, stage: Stage, reason: str,
                       validation_report: Path | None = None, drift: dict[str, float] | None = None) -> None: ...

    def prune(self, dataset: str, protected: set[str | None], policy: RetentionPolicy | None = None) -> None: ...

    # ---- what an operator does (train-mnist rollback / pin / unpin), under ``lock`` ----

    def has_version(self, dataset: str, version: str) -> bool: ...

    def production_history(self, dataset: str) -> list[str]: ...

    def move_production(self, dataset: str, version: str, compared: str | None) -> None: ...

    def pin(self, dataset: str) -> Pin | None: ...

    def set_pin(self, dataset: str, pin: Pin | None) -> None: ...

    def record_operation(self, dataset: str, outcome: Outcome, version: str, from_version: str | None,
                         reason: str | None, requested_by: str) -> None: ...


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
