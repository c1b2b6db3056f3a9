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
from pydantic import Field

from tasks import storage
from tasks.datasets import AUGMENTATION_FIELDS, IMAGE_SHAPE, NUM_PIXELS, ModelKind, Recipe, RecipeOptions
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


class TrainConfig(RecipeOptions):
    """Everything that decides the trained weights (with the data)."""

    model: ModelKind = "mlp"
    epochs: int = Field(default=DEFAULT_EPOCHS["mlp"], gt=0)
    batch_size: int = Field(default=128, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak rate; cosine decay to 0 over the epochs")
    seed: int = DEFAULT_SEED
    patience: int = Field(default=4, ge=1, description="Early stopping on validation loss")
    train_rows: int | None = Field(default=None, gt=0, description="Use only the first N train rows")


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


def applied_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Training parameters as they act: the mlp has no augmentation layers, so its shift/flip/rotation/zoom/erasing go."""
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
        if config.erase:
            x = layers.RandomErasing((config.erase, config.erase), fill_value=0.0, value_range=(0, 1), seed=config.seed)(x)
        x = _small_convnet(layers, x) if config.model == "cnn" else _batchnorm_convnet(layers, x)
        x = layers.Dense(128, activation="relu")(x)
        x = layers.Dropout(0.3 if config.model == "cnn-bn" else 0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"train_mnist_{config.model.replace('-', '_')}")
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, config.epochs * steps_per_epoch)
    # Label smoothing needs one-hot targets (training_targets gives them); without it the labels stay as they are.
    loss = (keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing) if config.label_smoothing
            else keras.losses.SparseCategoricalCrossentropy())
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=["accuracy"])
    return model


def training_targets(config: TrainConfig, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """What ``build_model``'s loss takes: the labels, or one-hot rows when labels are smoothed."""
    return np.eye(num_classes, dtype=np.float32)[labels] if config.label_smoothing else labels


def split_rows(config: TrainConfig, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, fit) row indices: a seeded ``validation_fraction`` of the rows, at least one (none at 0)."""
    order = np.random.default_rng(config.seed).permutation(rows)
    n_val = max(1, int(rows * config.validation_fraction)) if config.validation_fraction else 0
    return order[:n_val], order[n_val:]


SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows down, columns right), one pixel each way


def with_test_time_views(model, views: str):
    """``model`` wrapped so that it averages its probabilities over views of each image, built from standard layers.

    ``flip``: the image and its mirror; ``shifts``: the image and its four 1-pixel shifts. Inputs and outputs
    are unchanged (raw rows in, probabilities out), so whoever loads ``model.keras`` gets the views too.
    """
    if views == "none":
        return model
    keras = import_keras()
    layers = keras.layers
    inputs = keras.Input(shape=(NUM_PIXELS,), name="pixels")
    image = layers.Reshape((*IMAGE_SHAPE, 1), name="image")(inputs)
    if views == "flip":
        others = [keras.ops.flip(image, axis=2)]
    else:
        others = [_shifted(layers, image, down, right) for down, right in SHIFTS]
    flat = [inputs] + [layers.Reshape((NUM_PIXELS,))(view) for view in others]
    outputs = layers.Average(name="probabilities")([model(view) for view in flat])
    return keras.Model(inputs, outputs, name=f"{model.name}_{views}_views")


def _shifted(layers, image, down: int, right: int):
    """The image moved by (down, right) pixels, zeros coming in, same size."""
    pad = ((max(down, 0), max(-down, 0)), (max(right, 0), max(-right, 0)))
    crop = ((max(-down, 0), max(down, 0)), (max(-right, 0), max(right, 0)))
    return layers.Cropping2D(crop)(layers.ZeroPadding2D(pad)(image))


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
    targets = training_targets(config, labels, num_classes)
    val_idx, fit_idx = split_rows(config, len(labels))
    n_val = len(val_idx)
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
    x_fit, y_fit = pixels[fit_idx], targets[fit_idx]
    validation = (pixels[val_idx], targets[val_idx]) if n_val else None
    while state.epochs_done < config.epochs and not state.early_stopping.stopped:
        epoch = state.epochs_done
        perm = epoch_permutation(config.seed, epoch, len(fit_idx))
        history = model.fit(x_fit[perm], y_fit[perm], validation_data=validation, initial_epoch=epoch,
                            epochs=epoch + 1, batch_size=config.batch_size, shuffle=False, verbose=0,
                            callbacks=callbacks)
        logs = {k: vs[-1] for k, vs in history.history.items()}
        if validation is not None:
            state.early_stopping.update(epoch, float(logs["val_loss"]), model.get_weights())
        state.record(logs)
        backup.save(model, state)
    if state.early_stopping.best_weights is not None:
        model.set_weights(state.early_stopping.best_weights)
    storage.write_json(out_dir / HISTORY_FILE, state.curves)
    storage.write_json(out_dir / "resume.json", {"resumed_after_epoch": state.resumed_after,
                                                 "epochs_run": state.epochs_done - state.resumed_after})
    held_out = f"{n_val} held out for validation" if n_val else "none held out"
    plot_training_curves(state.curves, out_dir / CURVES_FILE, f"{config.model}: {len(fit_idx)} training rows, {held_out}")
    path = save_model(with_test_time_views(model, config.test_time_views), out_dir / MODEL_FILE)
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
