"""Resumable training: a backup of the training state after every completed epoch.

A run killed during training (even by SIGKILL) and started again continues after the last completed
epoch. The backup holds every model variable (weights, batch-norm statistics and the random-seed
state of the dropout and augmentation layers), the optimizer's variables (Adam moments and the step
count that drives the cosine schedule), the early-stopping state and the curves so far. Each epoch's
data order is a function of (seed, epoch) only, so a resumed run computes exactly what an
uninterrupted one would: same weights, same test predictions.

A backup is reused only for the same training data (SHA-256 of the train Parquet file), the same
``TrainConfig`` (recipe, seed, epochs, ...), the same number of classes and the same code (this
module's and ``tasks/training/train.py``'s source, Keras and TensorFlow versions). The key names the backup
folder and is checked again inside it. The backup is removed once the model is saved.

Keras's own ``BackupAndRestore`` callback is not enough here: it restores the epoch counter but not
the early-stopping callback's best weights, and ``fit``'s shuffle order depends on how many epochs
ran in the process, so a resumed run would train on other batches than an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks import storage

BACKUP_PREFIX = ".train-backup-"
EPOCH_PREFIX = "epoch-"
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
KEY_CHARS = 24
TMP_PREFIX = ".tmp-"  # + <host>-<pid>-<random>: whose snapshot is being written
ABANDONED_AFTER_S = 6 * 3600.0  # a snapshot of another machine's run still unfinished after this is left over

logger = logging.getLogger(__name__)


def backup_key(train_parquet: Path, num_classes: int, config_json: str) -> str:
    """What must be equal for a backup to be reused: data bytes, full config, classes and code."""
    import keras
    import tensorflow as tf

    code = hashlib.sha256()
    for module in (Path(__file__), Path(__file__).with_name("train.py")):
        code.update(module.read_bytes())
    parts = [storage.sha256_file(train_parquet), config_json, str(num_classes), code.hexdigest(), keras.__version__,
             tf.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the fit rows in ``epoch`` (0-based): depends on (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class EarlyStoppingState:
    """Keras ``EarlyStopping(monitor="val_loss", restore_best_weights=True)``'s state, kept across restarts."""

    patience: int
    wait: int = 0
    best: float | None = None
    best_epoch: int = 0
    stopped: bool = False
    best_weights: list[np.ndarray] | None = None

    def update(self, epoch: int, val_loss: float, weights: list[np.ndarray]) -> None:
        """Keras's rule: a lower val_loss resets the wait; ``patience`` epochs without one stop training."""
        if self.best_weights is None:
            self.best_weights, self.best_epoch = weights, epoch
        self.wait += 1
        if self.best is None or val_loss < self.best:
            self.best, self.best_epoch, self.best_weights, self.wait = val_loss, epoch, weights, 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped = True


@dataclass
class TrainingState:
    epochs_done: int
    early_stopping: EarlyStoppingState
    curves: dict[str, list[float]] = field(default_factory=dict)
    resumed_after: int = 0  # epochs restored from a backup when this process started

    def record(self, logs: dict[str, float]) -> None:
        for name, value in logs.items():
            self.curves.setdefault(name, []).append(float(value))
        self.epochs_done += 1


class TrainingBackup:
    """Per-epoch snapshots in ``<root>/.train-backup-<key>/epoch-NNNN``; each written whole, then renamed."""

    def __init__(self, root: Path, key: str):
        self.key = key
        self.dir = root / f"{BACKUP_PREFIX}{key[:KEY_CHARS]}"

    def snapshots(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(EPOCH_PREFIX)
                      and p.name[len(EPOCH_PREFIX):].isdigit())

    def restore(self, model, patience: int) -> TrainingState:
        """The state after the last completed epoch, loaded into ``model``; a fresh state if there is none."""
        fresh = TrainingState(epochs_done=0, early_stopping=EarlyStoppingState(patience=patience))
        for snapshot in reversed(self.snapshots()):
            try:
                return self._load(snapshot, model, patience)
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("training backup %s not usable (%s); trying an older one", snapshot, exc)
        return fresh

    def _load(self, snapshot: Path, model, patience: int) -> TrainingState:
        meta = json.loads((snapshot / STATE_FILE).read_text())
        if meta.get("key") != self.key:
            raise ValueError(f"key {meta.get('key')!r} in {snapshot / STATE_FILE}, expected {self.key!r}")
        with np.load(snapshot / ARRAYS_FILE, allow_pickle=False) as arrays:
            model_values = _ordered(arrays, "model")
            optimizer_values = _ordered(arrays, "optimizer")
            best = _ordered(arrays, "best") if meta["has_best_weights"] else None
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        _assign(model.variables, model_values, f"{snapshot}: model variables")
        _assign(model.optimizer.variables, optimizer_values, f"{snapshot}: optimizer variables")
        stopping = EarlyStoppingState(patience=patience, wait=meta["wait"], best=meta["best"],
                                      best_epoch=meta["best_epoch"], stopped=meta["stopped"], best_weights=best)
        epochs = meta["epochs_done"]
        logger.info("resuming training after epoch %d from %s", epochs, snapshot)
        return TrainingState(epochs_done=epochs, early_stopping=stopping, curves=meta["curves"], resumed_after=epochs)

    def save(self, model, state: TrainingState) -> Path:
        """Snapshot after ``state.epochs_done`` epochs; older snapshots are dropped once it is in place."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"{EPOCH_PREFIX}{state.epochs_done:04d}"
        tmp = self.dir / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        stopping = state.early_stopping
        arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.variables)}
        arrays |= {f"optimizer_{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
        arrays |= {f"best_{i}": w for i, w in enumerate(stopping.best_weights or [])}
        with open(tmp / ARRAYS_FILE, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        meta = {"key": self.key, "epochs_done": state.epochs_done, "curves": state.curves, "wait": stopping.wait,
                "best": stopping.best, "best_epoch": stopping.best_epoch, "stopped": stopping.stopped,
                "has_best_weights": stopping.best_weights is not None}
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another run with the same key wrote this epoch first; same key, same computation, same bytes.
            shutil.rmtree(tmp, ignore_errors=True)
        for older in self.snapshots():
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
        for stale in self.dir.glob(f"{TMP_PREFIX}*"):
            if abandoned(stale):
                shutil.rmtree(stale, ignore_errors=True)
        return final

    def remove(self) -> None:
        """This training is done: its snapshots go, and the folder once no other run is writing into it (a run
        with the same key may be mid-snapshot: its temporary folder stays, and so does the folder)."""
        for snapshot in self.snapshots():
            shutil.rmtree(snapshot, ignore_errors=True)
        for tmp in self.dir.glob(f"{TMP_PREFIX}*"):
            if abandoned(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: another run still writes here
            self.dir.rmdir()


def abandoned(tmp: Path) -> bool:
    """A snapshot being written by no one: its writer (on this machine) is dead, or it is older than
    ``ABANDONED_AFTER_S``. Another run with the same key may be writing its own right now; that one stays."""
    parts = tmp.name.removeprefix(TMP_PREFIX).rsplit("-", 2)
    if len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, someone else's
        return False
    try:
        return time.time() - tmp.stat().st_mtime > ABANDONED_AFTER_S
    except FileNotFoundError:
        return False


def _ordered(arrays, prefix: str) -> list[np.ndarray]:
    keys = sorted((k for k in arrays.files if k.startswith(prefix + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return [arrays[k] for k in keys]


def _assign(variables, values: list[np.ndarray], what: str) -> None:
    if len(variables) != len(values):
        raise ValueError(f"{what}: {len(values)} saved, the model has {len(variables)}")
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != value.shape:
            raise ValueError(f"{what}: {variable.path} has shape {tuple(variable.shape)}, saved {value.shape}")
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
