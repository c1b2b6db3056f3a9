"""What a run says about a model: the model card, the champion comparison, the confusion matrix (CSV, a labelled
PNG, table rows and Markdown for the Prefect UI) and the dataset run's summary.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.publishing.promote import PromotionDecision
from tasks.reporting.outcomes import NOT_PUBLISHED, DatasetOutcome
from tasks.results import GateDecision, Lineage, Metrics
from tasks.training.recipes import applied_parameters


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
               lineage: Lineage) -> str:
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
    for split, info in lineage.data.items():
        lines.append(f"| {split} | {info.location} | `{info.sha256}` | {'' if info.rows is None else info.rows} |")
    parameters = applied_parameters(lineage.parameters)
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
