"""Stage 7: publish a gated model to the registry and move the production pointer to it.

The decision is the same for every registry (``tasks.registry``: a folder or an MLflow server). Under the
dataset's publish lock (``tasks.publish_lock``: the Prefect server's global concurrency limit, or a file
lock without a server) the current production model (the champion) is loaded (Keras safe mode) and
re-scored on the challenger's own test Parquet file, so two runs can never both beat a stale champion;
``tasks.promote`` decides. A failed gate or a refused promotion publishes nothing and leaves the pointer
and every version as they were; the registry records why where it keeps such records (MLflow).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from tasks import history
from tasks.canary import CANARY_FILE, CanaryResult, run_canary, write_canary_batch
from tasks.canary import markdown as canary_markdown
from tasks.evaluate import Metrics
from tasks.model_card import champion_comparison_lines, confusion_matrix_csv, confusion_matrix_png, model_card
from tasks.outcome import NOT_PUBLISHED, DatasetOutcome
from tasks.promote import (
    PromotionDecision,
    PromotionPolicy,
    decide_promotion,
    first_version_decision,
    refusal_message,
)
from tasks.registry import Candidate, ChampionUnreadable, Published, Registry, open_registry
from tasks.retention import RetentionPolicy
from tasks.train import load_xy

logger = logging.getLogger(__name__)


class GateFailed(Exception):
    """The model did not pass its gates; nothing was published."""


class PromotionRefused(GateFailed):
    """The model passed its gates but is worse than the production model; nothing was published."""

    def __init__(self, message: str, promotion: PromotionDecision | None = None):
        super().__init__(message)
        self.promotion = promotion  # the comparison that refused it, for the run's summary


class CanaryRefused(PromotionRefused):
    """The model did not load, predict as evaluated, or answer within budget in a fresh process."""


def new_version_name(now: datetime | None = None, suffix: str | None = None) -> str:
    """Sortable and unique: UTC time plus a suffix (random unless given, e.g. from the flow run's id)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{suffix or uuid.uuid4().hex[:6]}"


def run_version_name(scheduled_start: datetime | None, flow_run_id: object | None) -> str:
    """A flow run's version: its scheduled start and the first hex digits of its id (random without a run)."""
    return new_version_name(scheduled_start, str(flow_run_id).replace("-", "")[:6] if flow_run_id else None)


def challenger_predictions(predictions_path: Path, metrics: Metrics, labels: np.ndarray) -> np.ndarray:
    """The challenger's predicted classes (``predictions.npy``), checked against its metrics and the test rows."""
    predictions = np.load(predictions_path, allow_pickle=False)
    if predictions.shape != labels.shape or metrics.test_rows != len(labels):
        raise ValueError(f"{predictions_path}: {predictions.shape} predictions and metrics of {metrics.test_rows} "
                         f"rows, expected one class per test row ({labels.shape}); not the same test split")
    accuracy = float(np.mean(predictions == labels))
    if abs(accuracy - metrics.test_accuracy) > 1e-9:
        raise ValueError(f"{predictions_path}: accuracy {accuracy:.6f} on the test split, but metrics say "
                         f"{metrics.test_accuracy:.6f}; predictions and metrics come from different evaluations")
    return predictions


def version_documents(candidate: Candidate, promotion: PromotionDecision | None,
                      canary: CanaryResult | None = None) -> dict[str, bytes]:
    """What is rendered for a version: metrics.json (gate, lineage, promotion, canary), matrix, model card."""
    metrics, decision = candidate.metrics, candidate.decision
    metrics_doc = {**metrics.model_dump(), "gate": decision.model_dump(), "version": candidate.version,
                   **candidate.lineage, "promotion": promotion.model_dump() if promotion else None,
                   "canary": canary.model_dump() if canary else None}
    documents = {
        "metrics.json": json.dumps(metrics_doc, indent=2).encode(),
        "confusion_matrix.csv": confusion_matrix_csv(metrics),
        "confusion_matrix.png": confusion_matrix_png(metrics, f"{candidate.dataset} {candidate.version}"),
    }
    if promotion is not None:
        card = model_card(candidate.dataset, candidate.version, metrics, decision, promotion, candidate.lineage)
        if canary is not None:
            card += "\n".join(canary_markdown(canary))
            card += f"\nTrend across this dataset's versions: [history.png](../{history.TREND_FILE})\n"
        documents["model_card.md"] = card.encode()
    return documents


def check_canary(candidate: Candidate, pixels: np.ndarray, challenger: np.ndarray, batch: Path) -> CanaryResult:
    """Score the candidate's model on its canary batch in a fresh process; refuse the promotion if it fails."""
    result = run_canary(candidate.model_path, write_canary_batch(pixels, challenger, batch))
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
        registry.record_unpublished(candidate, None, "gate_failed", message, version_documents(candidate, None))
        raise GateFailed(message)
    policy = policy or PromotionPolicy()
    pixels, labels = load_xy(candidate.test_parquet)
    challenger = challenger_predictions(candidate.predictions_path, candidate.metrics, labels)
    with registry.lock(dataset), tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        # Read under the lock: the champion is whatever the last publisher left, never a stale one.
        champion = registry.production(dataset)
        if champion is None:
            promotion = first_version_decision(labels, challenger, policy)
        else:
            try:
                champion_classes = registry.champion_predictions(dataset, champion, pixels)
            except ChampionUnreadable as exc:
                registry.record_unpublished(candidate, None, "champion_unreadable", str(exc),
                                            version_documents(candidate, None))
                raise
            promotion = decide_promotion(labels, challenger, champion_classes, champion, policy)
        if not promotion.promoted:
            message = refusal_message(dataset, version, promotion)
            registry.record_unpublished(candidate, promotion, "refused", message,
                                        version_documents(candidate, promotion))
            raise PromotionRefused(message, promotion)
        batch = Path(tmp) / CANARY_FILE
        try:
            canary = check_canary(candidate, pixels, challenger, batch)
        except CanaryRefused as exc:
            registry.record_unpublished(candidate, promotion, "canary_refused", str(exc),
                                        version_documents(candidate, promotion))
            raise
        documents = {**version_documents(candidate, promotion, canary), CANARY_FILE: batch.read_bytes()}
        return registry.publish(candidate, promotion, documents)


def publish_version(registry: Registry, candidate: Candidate, policy: PromotionPolicy | None = None,
                    retention: RetentionPolicy | None = None) -> Published:
    """``decide_and_publish``; every outcome is added to the dataset's history, and a publish then prunes
    old versions (``tasks.retention``) where the registry keeps them."""
    started = time.monotonic()
    try:
        published = decide_and_publish(registry, candidate, policy)
    except Exception as exc:
        outcome = "refused" if isinstance(exc, PromotionRefused) else "gate_failed" if isinstance(
            exc, GateFailed) else "failed"
        registry.record_history(candidate, outcome, time.monotonic() - started, reason=str(exc))
        raise
    try:  # the pointer has moved: what follows is bookkeeping, and must not report the model as unpublished
        registry.record_history(candidate, "published", time.monotonic() - started, published=published)
        registry.prune(candidate.dataset, {published.promotion.champion_version}, retention)
    except Exception as exc:  # noqa: BLE001 - logged; the published version stands
        logger.warning("%s %s is published, but its history or pruning failed: %s: %s", candidate.dataset,
                       candidate.version, type(exc).__name__, exc)
    return published


# ---- Prefect wrapper -----------------------------------------------------------------------------


def confusion_matrix_rows(metrics: Metrics) -> list[dict[str, Any]]:
    """The matrix as table rows: the true class first, one column per predicted class, then the class's recall.

    Predicted-class columns are named ``pred <class>``: the Prefect UI renders a table from JSON
    objects, and a browser lists integer-like keys ("0".."9") before every other key, which would put
    the row label after the counts.
    """
    return [{"true class": name, **{f"pred {p}": n for p, n in zip(metrics.class_names, row, strict=True)},
             "recall": round(metrics.recall[name], 4)}
            for name, row in zip(metrics.class_names, metrics.confusion_matrix, strict=True)]


def confusion_matrix_markdown(metrics: Metrics) -> list[str]:
    """The matrix as a Markdown table (rows = true class, columns = predicted class, recall last)."""
    lines = ["| true \\ predicted | " + " | ".join(metrics.class_names) + " | recall |",
             "| --- |" + " ---: |" * (len(metrics.class_names) + 1)]
    for name, row in zip(metrics.class_names, metrics.confusion_matrix, strict=True):
        cells = [f"**{n}**" if t == p else str(n) for (t, p), n in
                 zip(((name, q) for q in metrics.class_names), row, strict=True)]
        lines.append(f"| **{name}** | " + " | ".join(cells) + f" | {metrics.recall[name]:.4f} |")
    return lines


def summary_markdown(outcome: DatasetOutcome, metrics: Metrics, run_dir: Path | None = None) -> str:
    """The dataset run's summary artifact, published or not: outcome, metrics, gate, champion, matrix, paths."""
    title = f"published {outcome.version}" if outcome.published else f"{NOT_PUBLISHED} ({outcome.version})"
    lines = [f"# {outcome.dataset}: {title}", ""]
    if not outcome.published:
        lines += [f"**{outcome.headline}**", ""] + [f"- {r}" for r in outcome.reasons] + [""]
    lines += [f"Test accuracy **{metrics.test_accuracy:.4f}** on {metrics.test_rows} rows, loss {metrics.test_loss:.4f}.",
              "", "## Gate", ""]
    if outcome.gate is not None:
        lines += [f"**{'PASSED' if outcome.gate.passed else 'FAILED'}**", ""] + [f"- {r}" for r in outcome.gate.reasons]
    lines += ["", "## Champion comparison", ""]
    lines += champion_comparison_lines(outcome.promotion) if outcome.promotion else ["Not compared (the gate failed)."]
    lines += ["", "## Confusion matrix", "", *confusion_matrix_markdown(metrics), ""]
    if outcome.registry_path:
        lines.append(f"Registry folder (model, metrics, confusion matrix CSV/PNG, model card): `{outcome.registry_path}`")
    else:
        lines.append("Nothing was written to the registry; the production pointer is unchanged.")
    if run_dir is not None:
        lines.append(f"\nRun folder (metrics.json, predictions, training curves): `{run_dir}`")
    if outcome.validation_report:
        lines.append(f"\nValidation report (self-contained HTML, opens offline): `{outcome.validation_report}`")
    return "\n".join(lines) + "\n"


def _create_artifacts(outcome: DatasetOutcome, metrics: Metrics, run_dir: Path | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = outcome.dataset.replace("_", "-")
    state = "published" if outcome.published else NOT_PUBLISHED
    create_table_artifact(key=f"{key}-confusion-matrix", table=confusion_matrix_rows(metrics),
                          description=f"{outcome.dataset} {outcome.version} ({state}): confusion matrix, rows = true "
                                      "class, columns = predicted class")
    create_markdown_artifact(key=f"{key}-summary", markdown=summary_markdown(outcome, metrics, run_dir),
                             description=f"{outcome.dataset} {outcome.version}: {state}")


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
    except (GateFailed, ChampionUnreadable) as exc:
        if decision.passed:  # a failed gate was logged by the gate task
            logger.error("%s", exc)
        outcome = DatasetOutcome.from_exception(dataset, version, exc, promotion=getattr(exc, "promotion", None),
                                                **known)
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
