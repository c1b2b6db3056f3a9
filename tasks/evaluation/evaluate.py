"""Stage 5: score a saved model on the test split: accuracy, loss, per-class metrics, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from tasks import artifacts, storage
from tasks.conversion.parquet import load_xy
from tasks.model_io import predict_probabilities
from tasks.results import ConfusedPair, Evaluation, Metrics

METRICS_FILE, PREDICTIONS_FILE, PROBABILITIES_FILE = (artifacts.METRICS_FILE, artifacts.PREDICTIONS_FILE,
                                                      artifacts.PROBABILITIES_FILE)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], top_pairs: int = 5) -> Metrics:
    """Metrics of predicted probabilities against true labels."""
    n_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    cm = confusion_matrix(labels, predictions, n_classes)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    true_per_class, predicted_per_class = cm.sum(axis=1), cm.sum(axis=0)
    diag = np.diag(cm)
    recall = np.divide(diag, true_per_class, out=np.zeros(n_classes), where=true_per_class > 0)
    precision = np.divide(diag, predicted_per_class, out=np.zeros(n_classes), where=predicted_per_class > 0)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(((int(off[t, p]), t, p) for t in range(n_classes) for p in range(n_classes) if off[t, p]),
                   reverse=True)[:top_pairs]
    return Metrics(
        test_accuracy=float(diag.sum() / cm.sum()),
        test_loss=float(-np.log(picked).mean()),
        test_rows=int(len(labels)),
        class_names=list(class_names),
        precision={name: float(v) for name, v in zip(class_names, precision, strict=True)},
        recall={name: float(v) for name, v in zip(class_names, recall, strict=True)},
        confusion_matrix=cm.astype(int).tolist(),
        most_confused=[ConfusedPair(true=class_names[t], predicted=class_names[p], count=c) for c, t, p in pairs],
    )


def evaluate_model(model_path: Path, test_parquet: Path, class_names: list[str], out_dir: Path) -> Evaluation:
    """Score ``model_path`` on the test split: the metrics, every row's prediction and probabilities, handed on in
    memory and written to ``out_dir`` (``metrics.json``, ``predictions.npy``, ``probabilities.npy``) for people."""
    pixels, labels = load_xy(test_parquet)
    probabilities = predict_probabilities(model_path, pixels).astype(np.float32)
    predictions = probabilities.argmax(axis=1).astype(np.int16)
    metrics = compute_metrics(labels, probabilities, class_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / PREDICTIONS_FILE, predictions)
    np.save(out_dir / PROBABILITIES_FILE, probabilities)
    return Evaluation(metrics=metrics, predictions=predictions, probabilities=probabilities,
                      metrics_path=storage.write_text(out_dir / METRICS_FILE, metrics.model_dump_json(indent=2)),
                      predictions_path=out_dir / PREDICTIONS_FILE, probabilities_path=out_dir / PROBABILITIES_FILE)


# ---- Prefect wrapper -----------------------------------------------------------------------------


@task(name="evaluate", task_run_name="evaluate-{dataset}")
def evaluate_task(model_path: Path, test_parquet: Path, class_names: list[str], out_dir: Path,
                  dataset: str) -> Evaluation:
    from prefect import get_run_logger

    evaluation = evaluate_model(model_path, test_parquet, class_names, out_dir)
    metrics = evaluation.metrics
    get_run_logger().info("%s test accuracy %.4f, loss %.4f; most confused %s", dataset, metrics.test_accuracy,
                          metrics.test_loss, [(p.true, p.predicted, p.count) for p in metrics.most_confused[:3]])
    return evaluation
