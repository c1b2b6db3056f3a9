"""Fitting helpers that need neither Prefect nor TensorFlow (``research/screen.py`` uses them on any Keras backend)."""

from __future__ import annotations

import numpy as np

from tasks.model_io import import_keras
from tasks.training.recipes import TrainConfig


def training_targets(config: TrainConfig, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """What ``build_model``'s loss takes: the labels, or one-hot rows when labels are smoothed."""
    return np.eye(num_classes, dtype=np.float32)[labels] if config.label_smoothing else labels


def split_rows(config: TrainConfig, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, fit) row indices: a seeded ``validation_fraction`` of the rows, at least one (none at 0)."""
    order = np.random.default_rng(config.seed).permutation(rows)
    n_val = max(1, int(rows * config.validation_fraction)) if config.validation_fraction else 0
    return order[:n_val], order[n_val:]


def training_weights_keeper():
    """A callback that undoes what the end of every ``fit`` does when the optimizer keeps a moving average
    (``ema``): Keras writes the average over the weights, but training must go on from the weights
    themselves (fit runs once per epoch here, for the backups). Call ``restore(model)`` after each fit."""
    keras = import_keras()

    class KeepTrainingWeights(keras.callbacks.Callback):
        values: list[np.ndarray] | None = None

        def on_epoch_end(self, epoch, logs=None):
            if self.model.optimizer.use_ema:
                self.values = [np.array(v) for v in self.model.trainable_variables]

        def restore(self, model) -> None:
            for variable, value in zip(model.trainable_variables, self.values or [], strict=self.values is not None):
                variable.assign(value)
            self.values = None

    return KeepTrainingWeights()
