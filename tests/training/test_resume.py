"""Resumable training: a real SIGKILL mid-training, a restart that resumes, and the same model at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.conversion.convert import convert_to_parquet
from tasks.evaluation.evaluate import evaluate_model
from tasks.settings import PROJECT_ROOT
from tasks.training.recipes import TrainConfig
from tasks.training.resume import BACKUP_PREFIX, EPOCH_PREFIX, STATE_FILE, backup_key

pytestmark = pytest.mark.slow

CONFIG = TrainConfig(model="cnn", epochs=4, train_rows=3000, patience=4, rotate=0.05, seed=11)
CLASSES = [str(i) for i in range(10)]
KILL_AFTER = 2
DEADLINE_S = 600


@pytest.fixture(scope="module")
def parquet(catalog, slice_mirror, tmp_path_factory):
    spec = catalog["mnist"]
    out = tmp_path_factory.mktemp("pq")
    return {split: convert_to_parquet(slice_mirror / spec.split(split).path, out / f"{split}.parquet", False)
            for split in ("train", "test")}


def start(parquet: dict[str, Path], out: Path, backups: Path, config: TrainConfig, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.train_worker", str(parquet["train"]), str(out), str(backups),
             config.model_dump_json()],
            cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=DEADLINE_S) == 0, log.read_text()


def snapshots(backups: Path) -> list[int]:
    return sorted(int(p.name[len(EPOCH_PREFIX):]) for p in backups.glob(f"{BACKUP_PREFIX}*/{EPOCH_PREFIX}*")
                  if (p / STATE_FILE).is_file())


def score(parquet, out: Path):
    metrics = evaluate_model(out / "model.keras", parquet["test"], CLASSES, out).metrics
    return metrics, np.load(out / "predictions.npy")


def test_killed_training_resumes_after_its_last_epoch_and_ends_with_the_same_model(parquet, tmp_path):
    backups = tmp_path / "backups"
    log = tmp_path / "killed.log"
    proc = start(parquet, tmp_path / "killed", backups, CONFIG, log)
    deadline = time.monotonic() + DEADLINE_S
    while not snapshots(backups) or snapshots(backups)[-1] < KILL_AFTER:
        assert proc.poll() is None, f"training ended before it could be killed:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no backup of epoch {KILL_AFTER} in {DEADLINE_S} s:\n{log.read_text()}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left = snapshots(backups)
    saved = left[-1]
    assert KILL_AFTER <= saved < CONFIG.epochs, f"killed after epoch {saved}; the test needs a mid-training kill"
    assert not (tmp_path / "killed" / "model.keras").exists()

    # Another recipe and another seed in the same backup folder start from epoch 1 and leave it alone.
    for other in (CONFIG.model_copy(update={"model": "mlp", "epochs": 1}),
                  CONFIG.model_copy(update={"seed": CONFIG.seed + 1, "epochs": 1})):
        out = tmp_path / f"other-{other.model}-{other.seed}"
        finish(start(parquet, out, backups, other, tmp_path / "other.log"), tmp_path / "other.log")
        assert json.loads((out / "resume.json").read_text()) == {"resumed_after_epoch": 0, "epochs_run": 1}
        assert snapshots(backups) == left

    resumed_log = tmp_path / "resumed.log"
    finish(start(parquet, tmp_path / "resumed", backups, CONFIG, resumed_log), resumed_log)
    resume = json.loads((tmp_path / "resumed" / "resume.json").read_text())
    assert resume == {"resumed_after_epoch": saved, "epochs_run": CONFIG.epochs - saved}
    epochs = [line for line in resumed_log.read_text().splitlines() if line.startswith("epoch ")]
    assert epochs == [f"epoch {e}/{CONFIG.epochs}" for e in range(saved + 1, CONFIG.epochs + 1)], epochs
    assert not list(backups.glob(f"{BACKUP_PREFIX}*")), "the backup was not removed after a successful run"
    print(f"\nresume: killed after epoch {saved} of {CONFIG.epochs}; the restart ran "
          f"{resume['epochs_run']} epochs instead of {CONFIG.epochs}, saving {saved}")

    straight_log = tmp_path / "straight.log"
    finish(start(parquet, tmp_path / "straight", tmp_path / "straight-backups", CONFIG, straight_log), straight_log)
    assert json.loads((tmp_path / "straight" / "resume.json").read_text())["resumed_after_epoch"] == 0

    (resumed_metrics, resumed_pred), (straight_metrics, straight_pred) = (
        score(parquet, tmp_path / "resumed"), score(parquet, tmp_path / "straight"))
    assert np.array_equal(resumed_pred, straight_pred)
    assert resumed_metrics == straight_metrics
    curves = [json.loads((tmp_path / run / "training_curves.json").read_text()) for run in ("resumed", "straight")]
    assert curves[0] == curves[1] and len(curves[0]["loss"]) == CONFIG.epochs


def test_backup_key_changes_with_data_recipe_seed_and_classes(parquet, tmp_path):
    other_data = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(parquet["train"]).slice(1), other_data)
    base = backup_key(parquet["train"], 10, CONFIG.model_dump_json())
    variants = [
        backup_key(other_data, 10, CONFIG.model_dump_json()),
        backup_key(parquet["train"], 10, CONFIG.model_copy(update={"model": "cnn-bn"}).model_dump_json()),
        backup_key(parquet["train"], 10, CONFIG.model_copy(update={"seed": 12}).model_dump_json()),
        backup_key(parquet["train"], 10, CONFIG.model_copy(update={"zoom": 0.1}).model_dump_json()),
        backup_key(parquet["train"], 9, CONFIG.model_dump_json()),
    ]
    assert base == backup_key(parquet["train"], 10, CONFIG.model_dump_json())
    assert len({base, *variants}) == len(variants) + 1


def test_two_runs_with_one_backup_key_never_delete_each_others_snapshot_in_progress(tmp_path):
    """Before: a run saving (or finishing) deleted every ``.tmp-*`` folder under the shared key, including the
    snapshot another run with the same key was writing at that moment, which then failed to rename it."""
    import keras

    from tasks.training.resume import TMP_PREFIX, EarlyStoppingState, TrainingBackup, TrainingState

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live run, mid-snapshot
    try:
        backup = TrainingBackup(tmp_path, "k" * 64)
        backup.dir.mkdir(parents=True)
        host = __import__("socket").gethostname()
        writing = backup.dir / f"{TMP_PREFIX}{host}-{other.pid}-0123abcd"
        writing.mkdir()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        left_over = backup.dir / f"{TMP_PREFIX}{host}-{dead.pid}-4567ef00"
        left_over.mkdir()
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse")
        model.fit(np.zeros((4, 4)), np.zeros((4, 2)), epochs=1, verbose=0)
        backup.save(model, TrainingState(1, EarlyStoppingState(patience=2)))
        assert writing.is_dir() and not left_over.exists()
        backup.remove()  # this run is done; the other one is still writing
        assert writing.is_dir() and backup.snapshots() == []
    finally:
        other.kill()
        other.wait()
    backup.remove()
    assert not backup.dir.exists()
