"""Stage 4: train a Keras model on the train Parquet file and save a self-contained ``model.keras``.

The saved model takes a batch of raw rows, shape (N, 784), pixel values 0..255 in CSV order
(row-major 28x28), and returns class probabilities, shape (N, classes). It scales the pixels
itself, so anyone can score a CSV row with it without knowing how it was trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks import storage
from tasks.datasets import IMAGE_SHAPE, NUM_PIXELS, ModelKind, Recipe
from tasks.model_io import import_keras, save_model
from tasks.resume import TrainingBackup, backup_key, epoch_permutation

EpochCallback = Callable[[int, int, dict[str, float]], None]
# (epoch, epochs, batch, batches, running logs), called inside an epoch at most every PROGRESS_EVERY_S
BatchCallback = Callable[[int, int, int, int, dict[str, float]], None]
PROGRESS_EVERY_S = 5.0

DEFAULT_SEED = 42
MODEL_FILE, HISTORY_FILE, CURVES_FILE = "model.keras", "history.json", "training_curves.png"
# Epochs when a model other than the dataset's recipe is asked for without --epochs.
DEFAULT_EPOCHS: dict[str, int] = {"mlp": 12, "cnn": 15, "cnn-bn": 16}


class TrainConfig(BaseModel):
    """Everything that decides the trained weights (with the data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelKind = "mlp"
    epochs: int = Field(default=DEFAULT_EPOCHS["mlp"], gt=0)
    batch_size: int = Field(default=128, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak rate; cosine decay to 0 over the epochs")
    seed: int = DEFAULT_SEED
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    patience: int = Field(default=4, ge=1, description="Early stopping on validation loss")
    train_rows: int | None = Field(default=None, gt=0, description="Use only the first N train rows")
    translate: float = Field(default=0.1, ge=0, lt=0.5, description="Random shifts (CNNs only), share of the side")
    horizontal_flip: bool = False
    rotate: float = Field(default=0.0, ge=0, lt=0.5, description="Random rotations (CNNs only), share of a turn")
    zoom: float = Field(default=0.0, ge=0, lt=0.5, description="Random zoom (CNNs only), share of the side")


@dataclass(frozen=True)
class TrainedModel:
    """What training wrote: the model, its per-epoch curves (JSON) and their plot."""

    model: Path
    history: Path
    curves: Path

    @classmethod
    def in_folder(cls, out_dir: Path) -> TrainedModel:
        return cls(out_dir / MODEL_FILE, out_dir / HISTORY_FILE, out_dir / CURVES_FILE)


def train_config_for(recipe: Recipe, model: ModelKind | None = None, epochs: int | None = None, seed: int = DEFAULT_SEED,
                     train_rows: int | None = None) -> TrainConfig:
    """The dataset's recipe, with the run's overrides applied."""
    chosen = model or recipe.model
    default_epochs = recipe.epochs if chosen == recipe.model else DEFAULT_EPOCHS[chosen]
    augmentation = recipe.model_dump(exclude={"model", "epochs"})
    return TrainConfig(model=chosen, epochs=epochs or default_epochs, seed=seed, train_rows=train_rows, **augmentation)


AUGMENTATION_FIELDS = tuple(name for name in Recipe.model_fields if name not in ("model", "epochs"))


def applied_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Training parameters as they act: the mlp has no augmentation layers, so its shift/flip/rotation/zoom go."""
    if parameters.get("model") != "mlp":
        return dict(parameters)
    return {k: v for k, v in parameters.items() if k not in AUGMENTATION_FIELDS}


def load_xy(parquet_path: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 784) uint8 and labels (N,) int64 from a split's Parquet file."""
    table = pq.read_table(parquet_path)
    if limit is not None:
        table = table.slice(0, limit)
    columns = [column.to_numpy() for column in table.columns]
    labels = columns[0].astype(np.int64)
    pixels = np.column_stack(columns[1:]) if columns[1:] else np.empty((len(labels), 0), np.uint8)
    return pixels, labels


def build_model(config: TrainConfig, num_classes: int, steps_per_epoch: int = 1):
    """A compiled Keras model over raw 0..255 pixel rows (augmentation layers act in training only).

    - ``mlp``: the seeds' baseline, Dense 512-512 with dropout.
    - ``cnn``: small convnet (conv32-pool-conv64-pool-dense128, ~225K parameters).
    - ``cnn-bn``: conv32x2-pool-conv64x2-pool-dense128 with batch normalisation (~470K parameters).
    """
    keras = import_keras()
    layers = keras.layers

    inputs = keras.Input(shape=(NUM_PIXELS,), name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    if config.model == "mlp":
        for units in (512, 512):
            x = layers.Dense(units, activation="relu")(x)
            x = layers.Dropout(0.2)(x)
    else:
        x = layers.Reshape((*IMAGE_SHAPE, 1))(x)
        if config.horizontal_flip:
            x = layers.RandomFlip("horizontal", seed=config.seed)(x)
        if config.rotate:
            x = layers.RandomRotation(config.rotate, fill_mode="constant", seed=config.seed)(x)
        if config.zoom:
            x = layers.RandomZoom(config.zoom, fill_mode="constant", seed=config.seed)(x)
        if config.translate:
            x = layers.RandomTranslation(config.translate, config.translate, fill_mode="constant", seed=config.seed)(x)
        x = _small_convnet(layers, x) if config.model == "cnn" else _batchnorm_convnet(layers, x)
        x = layers.Dense(128, activation="relu")(x)
        x = layers.Dropout(0.3 if config.model == "cnn-bn" else 0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"train_mnist_{config.model.replace('-', '_')}")
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, config.epochs * steps_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _small_convnet(layers, x):
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    return layers.Flatten()(x)


def _batchnorm_convnet(layers, x):
    for filters in (32, 64):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    return layers.Dropout(0.3)(x)


def seed_everything(seed: int) -> None:
    """Same seed and data give the same weights: seeded RNGs and deterministic TF ops."""
    keras = import_keras()
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train_model(train_parquet: Path, num_classes: int, config: TrainConfig, out_dir: Path,
                on_epoch: EpochCallback | None = None, on_batch: BatchCallback | None = None,
                backup_root: Path | None = None) -> Path:
    """Fit a model on the train split (a seeded hold-out for early stopping); return ``model.keras``.

    One ``fit`` call per epoch, each on the rows in the order ``epoch_permutation(seed, epoch)``, with
    a backup after each (``tasks.resume``, in ``backup_root``, default ``out_dir``'s parent): a killed
    run started again resumes after its last completed epoch and ends with the same model.
    """
    keras = import_keras()

    seed_everything(config.seed)
    pixels, labels = load_xy(train_parquet, config.train_rows)
    order = np.random.default_rng(config.seed).permutation(len(labels))
    n_val = max(1, int(len(labels) * config.validation_fraction))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    model = build_model(config, num_classes, steps_per_epoch=math.ceil(len(fit_idx) / config.batch_size))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Early stopping on validation loss (not accuracy: on a 6k hold-out accuracy moves in steps and ties
    # keep the earliest epoch, which under cosine decay throws away the annealed final epochs) is kept in
    # the backed-up state by the loop below, as Keras's EarlyStopping resets itself at every fit call.
    callbacks: list = [
        keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard"), write_graph=False, profile_batch=0),
    ]
    if on_epoch is not None:
        total = config.epochs
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch(epoch + 1, total, {k: float(v) for k, v in (logs or {}).items()})
        ))
    if on_batch is not None:
        callbacks.append(progress_callback(on_batch, config.epochs, math.ceil(len(fit_idx) / config.batch_size)))
    backup = TrainingBackup(backup_root or out_dir.parent,
                            backup_key(train_parquet, num_classes, config.model_dump_json()))
    state = backup.restore(model, config.patience)
    x_fit, y_fit, validation = pixels[fit_idx], labels[fit_idx], (pixels[val_idx], labels[val_idx])
    while state.epochs_done < config.epochs and not state.early_stopping.stopped:
        epoch = state.epochs_done
        perm = epoch_permutation(config.seed, epoch, len(fit_idx))
        history = model.fit(x_fit[perm], y_fit[perm], validation_data=validation, initial_epoch=epoch,
                            epochs=epoch + 1, batch_size=config.batch_size, shuffle=False, verbose=0,
                            callbacks=callbacks)
        logs = {k: vs[-1] for k, vs in history.history.items()}
        state.early_stopping.update(epoch, float(logs["val_loss"]), model.get_weights())
        state.record(logs)
        backup.save(model, state)
    if state.early_stopping.best_weights is not None:
        model.set_weights(state.early_stopping.best_weights)
    storage.write_json(out_dir / HISTORY_FILE, state.curves)
    storage.write_json(out_dir / "resume.json", {"resumed_after_epoch": state.resumed_after,
                                                 "epochs_run": state.epochs_done - state.resumed_after})
    plot_training_curves(state.curves, out_dir / CURVES_FILE,
                         f"{config.model}: {len(fit_idx)} training rows, {len(val_idx)} held out for validation")
    path = save_model(model, out_dir / MODEL_FILE)
    backup.remove()
    return path


def progress_callback(on_batch: BatchCallback, epochs: int, batches: int, every_s: float = PROGRESS_EVERY_S):
    """A Keras callback that reports progress inside an epoch, at most once every ``every_s`` seconds."""
    keras = import_keras()

    class InEpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.last = epoch + 1, time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if now - self.last >= every_s:
                self.last = now
                on_batch(self.epoch, epochs, batch + 1, batches, {k: float(v) for k, v in (logs or {}).items()})

    return InEpochProgress()


def plot_training_curves(curves: dict[str, list[float]], dest: Path, title: str | None = None) -> Path:
    """Loss and accuracy per epoch, train and validation, side by side, with the values of a short run written out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = max((len(v) for v in curves.values()), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        values_seen: list[float] = []
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = curves.get(prefix + metric, [])
            values_seen += values
            ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
            if 0 < len(values) <= 3:  # a dot or two says little without its value
                for x, y in enumerate(values, start=1):
                    ax.annotate(f"{y:.4f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        # Sensible ranges even for one epoch, where autoscaling would zoom into a single value.
        if metric == "accuracy":
            low = min(values_seen, default=0.0)
            ax.set_ylim(max(0.0, min(low - 0.05, 0.9)), 1.0)
        else:
            ax.set_ylim(0.0, max(values_seen, default=1.0) * 1.15 or 1.0)
        ax.set_xlim(0.5, max(epochs, 1) + 0.5)
        if epochs <= 20:
            ax.set_xticks(range(1, max(epochs, 1) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Training curves ({epochs} epoch{'s' if epochs != 1 else ''})" + (f": {title}" if title else ""))
    fig.tight_layout()
    fig.savefig(dest)
    plt.close(fig)
    return dest


# ---- Prefect wrapper -----------------------------------------------------------------------------


@task(name="train", task_run_name="train-{dataset}-{config.model}")
def train_task(train_parquet: Path, num_classes: int, config: TrainConfig, out_dir: Path,
               dataset: str) -> TrainedModel:
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    progress = create_progress_artifact(progress=0.0, description=f"Training {dataset} ({config.model})")

    def report(epoch: int, total: int, logs: dict[str, float]) -> None:
        logger.info("%s epoch %d/%d: %s", dataset, epoch, total, ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
        update_progress_artifact(progress, progress=100.0 * epoch / total)

    def report_batch(epoch: int, total: int, batch: int, batches: int, logs: dict[str, float]) -> None:
        logger.info("%s epoch %d/%d: %d%% (%d/%d batches), %s", dataset, epoch, total, 100 * batch // batches, batch,
                    batches, ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))

    model_path = train_model(train_parquet, num_classes, config, out_dir, on_epoch=report, on_batch=report_batch)
    update_progress_artifact(progress, progress=100.0)
    return TrainedModel.in_folder(model_path.parent)
