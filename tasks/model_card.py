"""What a published version says about itself: the model card, the champion comparison, the confusion matrix
as CSV and as a labelled PNG.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from tasks.evaluate import Metrics
from tasks.gate import GateDecision
from tasks.promote import (
    PromotionDecision,
)
from tasks.train import applied_parameters


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
