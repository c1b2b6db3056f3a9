"""Stage 4: train a Keras model on the train Parquet file and save a self-contained ``model.keras``.

The saved model takes a batch of raw rows, shape (N, 784), pixel values 0..255 in CSV order
(row-major 28x28), and returns class probabilities, shape (N, classes). It scales the pixels
itself, so anyone can score a CSV row with it without knowing how it was trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from prefect import task

from tasks import artifacts, storage
from tasks.conversion.parquet import load_xy
from tasks.model_io import import_keras, save_model
from tasks.results import TrainedModel
from tasks.training.architectures import as_float32, build_model, with_test_time_views
from tasks.training.fitting import split_rows, training_targets, training_weights_keeper
from tasks.training.recipes import TrainConfig
from tasks.training.resume import TrainingBackup, backup_key, epoch_permutation

EpochCallback = Callable[[int, int, dict[str, float]], None]
# (epoch, epochs, batch, batches, running logs), called inside an epoch at most every PROGRESS_EVERY_S
BatchCallback = Callable[[int, int, int, int, dict[str, float]], None]
PROGRESS_EVERY_S = 5.0


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
    a backup after each (``tasks.training.resume``, in ``backup_root``, default ``out_dir``'s parent): a killed
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
        keras.callbacks.TensorBoard(log_dir=str(out_dir / artifacts.TENSORBOARD_DIR), write_graph=False, profile_batch=0),
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
    training_weights = training_weights_keeper()
    while state.epochs_done < config.epochs and not state.early_stopping.stopped:
        epoch = state.epochs_done
        perm = epoch_permutation(config.seed, epoch, len(fit_idx))
        history = model.fit(x_fit[perm], y_fit[perm], validation_data=validation, initial_epoch=epoch,
                            epochs=epoch + 1, batch_size=config.batch_size, shuffle=False, verbose=0,
                            callbacks=[*callbacks, training_weights])
        training_weights.restore(model)
        logs = {k: vs[-1] for k, vs in history.history.items()}
        if validation is not None:
            state.early_stopping.update(epoch, float(logs["val_loss"]), model.get_weights())
        state.record(logs)
        backup.save(model, state)
    if config.ema:  # the moving average is the model; early stopping only decided when to stop
        model.optimizer.finalize_variable_values(model.trainable_variables)
    elif state.early_stopping.best_weights is not None:
        model.set_weights(state.early_stopping.best_weights)
    storage.write_json(out_dir / artifacts.CURVES_JSON, state.curves)
    storage.write_json(out_dir / artifacts.RESUME_FILE, {"resumed_after_epoch": state.resumed_after,
                                                 "epochs_run": state.epochs_done - state.resumed_after})
    held_out = f"{n_val} held out for validation" if n_val else "none held out"
    plot_training_curves(state.curves, out_dir / artifacts.CURVES_PNG, f"{config.model}: {len(fit_idx)} training rows, {held_out}")
    path = save_model(with_test_time_views(as_float32(model, config, num_classes), config.test_time_views),
                      out_dir / artifacts.MODEL_FILE)
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
            if not values:
                continue  # no hold-out: no validation curve, and no empty legend entry for one
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
