"""Stage 7: publish a gated model as a new registry version and move the production pointer to it.

Registry layout::

    <registry>/<dataset>/<version>/{model.keras, metrics.json, confusion_matrix.csv,
                                    confusion_matrix.png, training_curves.png, model_card.md}
    <registry>/<dataset>/production      # the current version's name

A version is assembled in a hidden staging folder, fsynced and renamed into place whole; the
pointer is then replaced atomically. Publishing of one dataset is serialised by a lock file, so
concurrent runs never interleave: the pointer names the version of the run that published last.

Before publishing, the current production model (the champion) is loaded (Keras safe mode) and
re-scored on the challenger's own test Parquet file, under the same lock, so two runs can never both
beat a stale champion; ``tasks.promote`` decides. A failed gate or a refused promotion publishes
nothing and leaves the pointer and every version as they were.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from tasks.evaluate import Metrics, predict_probabilities, read_metrics
from tasks.gate import GateDecision
from tasks.outcome import NOT_PUBLISHED, DatasetOutcome
from tasks.promote import (
    PromotionDecision,
    PromotionPolicy,
    decide_promotion,
    first_version_decision,
    refusal_message,
)
from tasks.train import applied_parameters, load_xy

POINTER = "production"
STAGING_PREFIX = ".staging-"
VERSION_FILES = ("model.keras", "metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "model_card.md")


class GateFailed(Exception):
    """The model did not pass its gates; nothing was published."""


class PromotionRefused(GateFailed):
    """The model passed its gates but is worse than the production model; nothing was published."""

    def __init__(self, message: str, promotion: PromotionDecision | None = None):
        super().__init__(message)
        self.promotion = promotion  # the comparison that refused it, for the run's summary


class ChampionUnreadable(RuntimeError):
    """The production model cannot be loaded or scored, so no challenger can be compared with it."""


def new_version_name(now: datetime | None = None, suffix: str | None = None) -> str:
    """Sortable and unique: UTC time plus a suffix (random unless given, e.g. from the flow run's id)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{suffix or uuid.uuid4().hex[:6]}"


def read_production(registry: Path, dataset: str) -> str | None:
    pointer = registry / dataset / POINTER
    return pointer.read_text().strip() or None if pointer.is_file() else None


def list_versions(registry: Path, dataset: str) -> list[str]:
    root = registry / dataset
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_complete_version(path: Path) -> bool:
    return all((path / name).is_file() for name in VERSION_FILES)


@contextlib.contextmanager
def dataset_lock(registry: Path, dataset: str) -> Iterator[None]:
    """Exclusive lock on a dataset's registry folder; released by the OS if the process dies."""
    root = registry / dataset
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _copy_file(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def set_production(registry: Path, dataset: str, version: str) -> None:
    """Point production at ``version`` with one atomic rename."""
    root = registry / dataset
    tmp = root / f".{POINTER}.{uuid.uuid4().hex}.tmp"
    _write_file(tmp, f"{version}\n".encode())
    os.replace(tmp, root / POINTER)
    _fsync_dir(root)


def remove_stale_staging(registry: Path, dataset: str) -> None:
    """Staging folders left by a killed publisher are never visible versions; clear them (under the lock)."""
    root = registry / dataset
    for stale in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{POINTER}.*.tmp"):
        stale.unlink(missing_ok=True)


def confusion_matrix_csv(metrics: Metrics) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\predicted", *metrics.class_names])
    for name, row in zip(metrics.class_names, metrics.confusion_matrix, strict=True):
        writer.writerow([name, *row])
    return buffer.getvalue().encode()


def confusion_matrix_png(metrics: Metrics, title: str) -> bytes:
    """A labelled heatmap: rows are true classes, columns predictions, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.array(metrics.confusion_matrix)
    n = len(metrics.class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n), dpi=100)
    image = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), metrics.class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), metrics.class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\ntest accuracy {metrics.test_accuracy:.4f}")
    threshold = cm.max() / 2 if cm.size else 0
    for t in range(n):
        for p in range(n):
            ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=7,
                    color="white" if cm[t, p] > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def model_card(dataset: str, version: str, metrics: Metrics, decision: GateDecision, promotion: PromotionDecision,
               lineage: dict[str, Any]) -> str:
    """A short human-readable card: data, parameters, metrics and why it was published."""
    lines = [
        f"# {dataset} model {version}",
        "",
        f"Published {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC by the `train-mnist` flow.",
        "",
        "Input: a batch of raw rows, shape (N, 784), pixels 0..255 in CSV order (row-major 28x28); "
        "output: class probabilities. Load with `keras.saving.load_model(path, safe_mode=True)`.",
        "",
        "## Data",
        "",
        "| split | location | sha256 | rows |",
        "| --- | --- | --- | --- |",
    ]
    for split, info in lineage.get("data", {}).items():
        lines.append(f"| {split} | {info.get('location')} | `{info.get('sha256')}` | {info.get('rows', '')} |")
    parameters = applied_parameters(lineage.get("parameters", {}))
    lines += ["", "## Parameters", "", "```json", json.dumps(parameters, indent=2), "```", ""]
    lines += [
        "## Metrics",
        "",
        f"- test accuracy: **{metrics.test_accuracy:.4f}** on {metrics.test_rows} rows; test loss {metrics.test_loss:.4f}",
        "",
        "| class | precision | recall |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {n} | {metrics.precision[n]:.4f} | {metrics.recall[n]:.4f} |" for n in metrics.class_names]
    lines += ["", "Most confused (true -> predicted: count): "
              + ", ".join(f"{p.true} -> {p.predicted}: {p.count}" for p in metrics.most_confused), ""]
    lines += ["## Gate decision", "", f"**{'PASSED' if decision.passed else 'FAILED'}**", ""]
    lines += [f"- {reason}" for reason in decision.reasons]
    lines += ["", "## Champion comparison", ""] + champion_comparison_lines(promotion)
    return "\n".join(lines) + "\n"


def champion_comparison_lines(promotion: PromotionDecision) -> list[str]:
    """The promotion decision as Markdown: the paired comparison with the champion, or why there was none."""
    verdict = "PROMOTED" if promotion.promoted else "REFUSED"
    if promotion.champion_version is None:
        return [f"**{verdict}**: no champion (first version of this dataset); the absolute gates alone decided. "
                f"Test accuracy {promotion.challenger_accuracy:.4f} on {promotion.test_rows} rows.", ""]
    lines = [
        f"**{verdict}** against champion `{promotion.champion_version}`, both scored on the same "
        f"{promotion.test_rows} test rows.",
        "",
        "| | value |",
        "| --- | --- |",
        f"| challenger test accuracy | {promotion.challenger_accuracy:.4f} |",
        f"| champion test accuracy | {promotion.champion_accuracy:.4f} |",
        f"| challenger right, champion wrong (b) | {promotion.challenger_only_right} |",
        f"| champion right, challenger wrong (c) | {promotion.champion_only_right} |",
        f"| McNemar exact p-value (two-sided) | {promotion.p_value:.4g} |",
        f"| tolerance / alpha | {promotion.tolerance} / {promotion.alpha} |",
        "",
    ]
    return lines + [f"- {reason}" for reason in promotion.reasons]


@dataclass(frozen=True)
class Published:
    dataset: str
    version: str
    path: Path
    promotion: PromotionDecision


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


def champion_predictions(model_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Predicted classes of a saved model (loaded in Keras safe mode) on raw pixel rows."""
    return predict_probabilities(model_path, pixels).argmax(axis=1)


def score_champion(registry: Path, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray:
    """Re-score the production model on the challenger's test rows; a clear error if it cannot be."""
    model_path = registry / dataset / champion / "model.keras"
    fix = (f"; nothing was published. Restore the file, or point {registry / dataset / POINTER} "
           "at a readable version")
    if not model_path.is_file():
        raise ChampionUnreadable(f"{dataset}: champion {champion}'s model file {model_path} is missing{fix}")
    try:
        predictions = champion_predictions(model_path, pixels)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run it means the same: no comparison
        raise ChampionUnreadable(f"{dataset}: champion {champion}'s model file {model_path} cannot be loaded "
                                 f"or scored ({type(exc).__name__}: {exc}){fix}") from exc
    if predictions.shape != (len(pixels),):
        raise ChampionUnreadable(f"{dataset}: champion {champion}'s model {model_path} gave {predictions.shape} "
                                 f"predictions for {len(pixels)} test rows{fix}")
    return predictions


def publish_version(registry: Path, dataset: str, version: str, model_path: Path, metrics: Metrics,
                    decision: GateDecision, lineage: dict[str, Any], *, test_parquet: Path, predictions_path: Path,
                    extra_files: dict[str, Path] | None = None, policy: PromotionPolicy | None = None,
                    ) -> Published:
    """Write a complete version and switch production to it, if it passed its gates and is not worse than
    the champion (re-scored on ``test_parquet``, the split ``predictions_path`` was made from)."""
    if not decision.passed:
        raise GateFailed(f"{dataset}: gate failed, nothing published:\n- " + "\n- ".join(decision.reasons))
    policy = policy or PromotionPolicy()
    pixels, labels = load_xy(test_parquet)
    challenger = challenger_predictions(predictions_path, metrics, labels)
    with dataset_lock(registry, dataset):
        remove_stale_staging(registry, dataset)
        root = registry / dataset
        final = root / version
        if final.exists():
            raise FileExistsError(f"{final} already exists; versions are never overwritten")
        # Read under the lock: the champion is whatever the last publisher left, never a stale one.
        champion = read_production(registry, dataset)
        if champion is None:
            promotion = first_version_decision(labels, challenger, policy)
        else:
            promotion = decide_promotion(labels, challenger, score_champion(registry, dataset, champion, pixels),
                                         champion, policy)
        if not promotion.promoted:
            raise PromotionRefused(refusal_message(dataset, version, promotion), promotion)
        staging = root / f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        _copy_file(model_path, staging / "model.keras")
        for name, src in (extra_files or {}).items():
            _copy_file(src, staging / name)
        metrics_doc = {**metrics.model_dump(), "gate": decision.model_dump(), "version": version, **lineage,
                       "promotion": promotion.model_dump()}
        _write_file(staging / "metrics.json", json.dumps(metrics_doc, indent=2).encode())
        _write_file(staging / "confusion_matrix.csv", confusion_matrix_csv(metrics))
        _write_file(staging / "confusion_matrix.png", confusion_matrix_png(metrics, f"{dataset} {version}"))
        _write_file(staging / "model_card.md",
                    model_card(dataset, version, metrics, decision, promotion, lineage).encode())
        _fsync_dir(staging)
        os.rename(staging, final)
        _fsync_dir(root)
        set_production(registry, dataset, version)
    return Published(dataset, version, final, promotion)


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


@task(name="publish", task_run_name="publish-{dataset}")
def publish_task(registry: Path, dataset: str, version: str, model_path: Path, metrics_path: Path,
                 decision: GateDecision, lineage: dict[str, Any], extra_files: dict[str, Path],
                 test_parquet: Path, predictions_path: Path, policy: PromotionPolicy | None = None,
                 validation_report: Path | None = None) -> DatasetOutcome:
    """Publish if allowed; the outcome either way (an expected refusal is a value, logged once, not raised)."""
    from prefect import get_run_logger

    logger = get_run_logger()
    metrics = read_metrics(metrics_path)
    known = {"test_accuracy": metrics.test_accuracy, "gate": decision,
             "validation_report": str(validation_report) if validation_report else None}
    try:
        published = publish_version(registry, dataset, version, model_path, metrics, decision, lineage,
                                    test_parquet=test_parquet, predictions_path=predictions_path,
                                    extra_files=extra_files, policy=policy)
    except (GateFailed, ChampionUnreadable) as exc:
        if decision.passed:  # a failed gate was logged by the gate task
            logger.error("%s", exc)
        outcome = DatasetOutcome.from_exception(dataset, version, exc, promotion=getattr(exc, "promotion", None),
                                                **known)
    else:
        outcome = DatasetOutcome(dataset=dataset, version=version, published=True,
                                 headline=f"{dataset}: published {version}", registry_path=str(published.path),
                                 promotion=published.promotion, **known)
        logger.info("published %s %s; production -> %s", dataset, version, published.path)
    try:
        _create_artifacts(outcome, metrics, model_path.parent)
    except Exception as exc:  # noqa: BLE001 - artifacts are a view; the registry is the truth
        logger.warning("%s %s is %s, but its Prefect artifacts could not be created: %s: %s", dataset, version,
                       "published (production points at it)" if outcome.published else "not published",
                       type(exc).__name__, exc)
    return outcome
