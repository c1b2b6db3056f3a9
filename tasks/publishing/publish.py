"""Stage 7: publish a gated model to the registry and move the production pointer to it.

The decision is the same for every registry (``tasks.registry``: a folder or an MLflow server). Under the
dataset's publish lock (``tasks.registry.lock``: the Prefect server's global concurrency limit, or a file
lock without a server) the current production model (the champion) is loaded (Keras safe mode) and
re-scored on the challenger's own test Parquet file, so two runs can never both beat a stale champion;
``tasks.publishing.promote`` decides. A failed gate or a refused promotion publishes nothing and leaves the pointer
and every version as they were; the registry records why where it keeps such records (MLflow).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from prefect import task

from tasks import artifacts
from tasks.conversion.parquet import load_xy
from tasks.publishing.canary import CANARY_FILE, CanaryResult, run_canary, write_canary_batch
from tasks.publishing.canary import markdown as canary_markdown
from tasks.publishing.model_card import (
    confusion_matrix_csv,
    confusion_matrix_png,
    confusion_matrix_rows,
    model_card,
    summary_markdown,
)
from tasks.publishing.promote import (
    PromotionDecision,
    PromotionPolicy,
    decide_promotion,
    first_version_decision,
    refusal_message,
)
from tasks.registry import Candidate, ChampionUnreadable, Published, Registry, open_registry
from tasks.registry.interface import PublishConflict
from tasks.registry.lock import PublishLockUnsafe
from tasks.registry.retention import RetentionPolicy
from tasks.reporting.outcomes import NOT_PUBLISHED, DatasetOutcome
from tasks.results import Metrics
from tasks.vocabulary import Outcome, Stage, StageFailure

logger = logging.getLogger(__name__)


class GateFailed(StageFailure):
    """The model did not pass its gates; nothing was published."""
    stage = Stage.GATE
    outcome = Outcome.GATE_FAILED


class PromotionRefused(GateFailed):
    """The model passed its gates but is worse than the production model; nothing was published."""
    stage = Stage.PROMOTION
    outcome = Outcome.REFUSED

    def __init__(self, message: str, promotion: PromotionDecision | None = None):
        super().__init__(message)
        self.promotion = promotion  # the comparison that refused it, for the run's summary


class ProductionPinned(StageFailure):
    """Production is pinned by an operator: this model was trained, evaluated and recorded, not published."""

    stage = Stage.PUBLISH
    outcome = Outcome.PINNED

    def __init__(self, message: str, promotion: PromotionDecision | None = None):
        super().__init__(message)
        self.promotion = promotion


class CanaryRefused(PromotionRefused):
    """The model did not load, predict as evaluated, or answer within budget in a fresh process."""
    stage = Stage.CANARY


def challenger_predictions(candidate: Candidate, labels: np.ndarray) -> np.ndarray:
    """The challenger's predicted classes (evaluation's), checked against its metrics and the test rows."""
    predictions, metrics = np.asarray(candidate.predictions), candidate.metrics
    where = f"{candidate.dataset} {candidate.version}"
    if predictions.shape != labels.shape or metrics.test_rows != len(labels):
        raise ValueError(f"{where}: {predictions.shape} predictions and metrics of {metrics.test_rows} rows, expected "
                         f"one class per row of {candidate.test_parquet} ({labels.shape}); not the same test split")
    accuracy = float(np.mean(predictions == labels))
    if abs(accuracy - metrics.test_accuracy) > 1e-9:
        raise ValueError(f"{where}: accuracy {accuracy:.6f} on {candidate.test_parquet}, but metrics say "
                         f"{metrics.test_accuracy:.6f}; predictions and metrics come from different evaluations")
    return predictions


def version_documents(candidate: Candidate, promotion: PromotionDecision | None,
                      canary: CanaryResult | None = None) -> dict[str, bytes]:
    """What is rendered for a version: metrics.json (gate, lineage, promotion, canary), matrix, model card."""
    metrics, decision = candidate.metrics, candidate.decision
    metrics_doc = {**metrics.model_dump(), "gate": decision.model_dump(), "version": candidate.version,
                   **candidate.lineage.as_document(), "promotion": promotion.model_dump() if promotion else None,
                   "canary": canary.model_dump() if canary else None}
    documents = {
        artifacts.METRICS_FILE: json.dumps(metrics_doc, indent=2).encode(),
        artifacts.CONFUSION_CSV: confusion_matrix_csv(metrics),
        artifacts.CONFUSION_PNG: confusion_matrix_png(metrics, f"{candidate.dataset} {candidate.version}"),
    }
    if promotion is not None:
        card = model_card(candidate.dataset, candidate.version, metrics, decision, promotion, candidate.lineage)
        if canary is not None:
            card += "\n".join(canary_markdown(canary))
            card += f"\nTrend across this dataset's versions: [{artifacts.TREND_PNG}](../{artifacts.TREND_PNG})\n"
        documents[artifacts.MODEL_CARD] = card.encode()
    return documents


def check_canary(candidate: Candidate, pixels: np.ndarray, challenger: np.ndarray, batch: Path) -> CanaryResult:
    """Score the candidate's model on its canary batch in a fresh process; refuse the promotion if it fails."""
    result = run_canary(candidate.model_path, write_canary_batch(pixels, challenger, batch, candidate.probabilities))
    if not result.passed:
        raise CanaryRefused(f"{candidate.dataset}: {candidate.version} not promoted, its canary failed in a fresh "
                            "Python process (nothing published):\n- " + "\n- ".join(result.reasons))
    return result


def decide_and_publish(registry: Registry, candidate: Candidate, policy: PromotionPolicy | None = None) -> Published:
    """Publish ``candidate`` and switch production to it, if it passed its gates, is not worse than the champion
    (re-scored on ``candidate.test_parquet``, the split its predictions were made from) and passes its canary."""
    dataset, version = candidate.dataset, candidate.version
    if not candidate.decision.passed:
        message = f"{dataset}: gate failed, nothing published:\n- " + "\n- ".join(candidate.decision.reasons)
        raise refused(registry, candidate, None, "gate_failed", GateFailed(message))
    policy = policy or PromotionPolicy()
    pixels, labels = load_xy(candidate.test_parquet)
    challenger = challenger_predictions(candidate, labels)
    with registry.lock(dataset), tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        # Read under the lock: the champion is whatever the last publisher left, never a stale one.
        champion = registry.production(dataset)
        if champion is None:
            promotion = first_version_decision(labels, challenger, policy)
        else:
            try:
                champion_classes = registry.champion_predictions(dataset, champion, pixels)
            except ChampionUnreadable as exc:
                raise refused(registry, candidate, None, "champion_unreadable", exc)  # noqa: B904 - it is exc
            promotion = decide_promotion(labels, challenger, champion_classes, champion, policy)
        if not promotion.promoted:
            raise refused(registry, candidate, promotion, "refused",
                          PromotionRefused(refusal_message(dataset, version, promotion), promotion))
        batch = Path(tmp) / CANARY_FILE
        try:
            canary = check_canary(candidate, pixels, challenger, batch)
        except CanaryRefused as exc:
            raise refused(registry, candidate, promotion, "canary_refused", exc)  # noqa: B904 - it is exc
        pin = registry.pin(dataset)
        if pin is not None:
            raise refused(registry, candidate, promotion, "pinned", ProductionPinned(
                f"{dataset}: {version} not published: production is pinned at {pin.version} by {pin.by} on "
                f"{pin.at}{': ' + pin.reason if pin.reason else ''} (it would have been promoted; "
                f"train-mnist unpin --dataset {dataset} ends the pin)", promotion))
        documents = {**version_documents(candidate, promotion, canary), CANARY_FILE: batch.read_bytes()}
        return dataclasses.replace(registry.publish(candidate, promotion, documents), canary=canary)


def refused(registry: Registry, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
            error: Exception) -> Exception:
    """Record why ``candidate`` is not published (where the registry keeps such records); the error to raise."""
    registry.record_unpublished(candidate, promotion, decision, str(error), version_documents(candidate, promotion))
    return error


def publish_version(registry: Registry, candidate: Candidate, policy: PromotionPolicy | None = None,
                    retention: RetentionPolicy | None = None) -> Published:
    """``decide_and_publish``; every outcome is added to the dataset's history, and a publish then prunes
    old versions (``tasks.registry.retention``) where the registry keeps them."""
    started = time.monotonic()
    try:
        published = decide_and_publish(registry, candidate, policy)
    except Exception as exc:
        # A bug in publishing is still a failure at the publish stage; an expected one carries its own.
        outcome, stage = (exc.outcome, exc.stage) if isinstance(exc, StageFailure) else (Outcome.FAILED, Stage.PUBLISH)
        registry.record_history(candidate, outcome, time.monotonic() - started, reason=str(exc), stage=stage)
        raise
    try:  # the pointer has moved: what follows is bookkeeping, and must not report the model as unpublished
        registry.record_history(candidate, Outcome.PUBLISHED, time.monotonic() - started, published=published)
        registry.prune(candidate.dataset, {published.promotion.champion_version}, retention)
    except Exception as exc:  # noqa: BLE001 - logged; the published version stands
        logger.warning("%s %s is published, but its history or pruning failed: %s: %s", candidate.dataset,
                       candidate.version, type(exc).__name__, exc)
    return published


# ---- Prefect wrapper -----------------------------------------------------------------------------


def _create_artifacts(outcome: DatasetOutcome, metrics: Metrics, run_dir: Path | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = outcome.dataset.replace("_", "-")
    state = "published" if outcome.published else NOT_PUBLISHED
    create_table_artifact(key=f"{key}-confusion-matrix", table=confusion_matrix_rows(metrics),
                          description=f"{outcome.dataset} {outcome.version} ({state}): confusion matrix, rows = true "
                                      "class, columns = predicted class")
    create_markdown_artifact(key=f"{key}-summary", markdown=summary_markdown(outcome, metrics, run_dir),
                             description=f"{outcome.dataset} {outcome.version}: {state}")


# Why publishing may refuse a model that passed training: each is told as one clean message, not a traceback.
PUBLISH_REFUSALS = (GateFailed, ChampionUnreadable, PublishConflict, PublishLockUnsafe, ProductionPinned)


@task(name="publish", task_run_name="publish-{candidate.dataset}")
def publish_task(registry: str, candidate: Candidate, policy: PromotionPolicy | None = None,
                 validation_report: Path | None = None) -> DatasetOutcome:
    """Publish if allowed; the outcome either way (an expected refusal is a value, logged once, not raised)."""
    from prefect import get_run_logger

    logger = get_run_logger()
    dataset, version, metrics, decision = candidate.dataset, candidate.version, candidate.metrics, candidate.decision
    known = {"test_accuracy": metrics.test_accuracy, "gate": decision,
             "validation_report": str(validation_report) if validation_report else None}
    try:
        published = publish_version(open_registry(registry), candidate, policy=policy)
    except PUBLISH_REFUSALS as exc:
        if decision.passed:  # a failed gate was logged by the gate task
            logger.error("%s", exc)
        outcome = DatasetOutcome.from_exception(dataset, version, exc, promotion=getattr(exc, "promotion", None),
                                                stage=exc.stage, held=isinstance(exc, ProductionPinned), **known)
    else:
        outcome = DatasetOutcome(dataset=dataset, version=version, published=True,
                                 headline=f"{dataset}: published {version}", registry_path=published.location,
                                 promotion=published.promotion, **known)
        logger.info("published %s %s; production -> %s", dataset, version, published.location)
    try:
        _create_artifacts(outcome, metrics, candidate.model_path.parent)
    except Exception as exc:  # noqa: BLE001 - artifacts are a view; the registry is the truth
        logger.warning("%s %s is %s, but its Prefect artifacts could not be created: %s: %s", dataset, version,
                       "published (production points at it)" if outcome.published else "not published",
                       type(exc).__name__, exc)
    return outcome
