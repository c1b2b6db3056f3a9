"""The folder registry, the embedded default: versions as folders, production as a one-line pointer file.

    <registry>/<dataset>/<version>/{model.keras, metrics.json, confusion_matrix.csv,
                                    confusion_matrix.png, training_curves.png, model_card.md, ...}
    <registry>/<dataset>/production      # the current version's name

A version is assembled in a hidden staging folder, fsynced and renamed into place whole; the pointer
is then replaced atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks import artifacts, storage
from tasks.model_io import load_model, predict_classes
from tasks.publishing.promote import PromotionDecision
from tasks.registry import run_log
from tasks.registry.interface import (
    Candidate,
    ChampionUnreadable,
    Pin,
    PublishConflict,
    Published,
    champion_fix_hint,
    check_fence,
    scored_champion,
)
from tasks.registry.lock import folder_identity, publish_lock
from tasks.registry.retention import RetentionPolicy, prune_versions
from tasks.vocabulary import Outcome, Stage

POINTER = artifacts.POINTER
STAGING_PREFIX = ".staging-"



def read_production(registry: Path, dataset: str) -> str | None:
    """The production version's name; None only when there is no pointer at all.

    A pointer that is empty, is not a regular file, or names a version that is not a folder of the
    registry raises ``ChampionUnreadable`` naming the file: damage must not read as "no champion".
    """
    registry = Path(registry)
    pointer = registry / dataset / POINTER
    if not os.path.lexists(pointer):
        return None
    fix = "; nothing was published. Repair it, or remove it to publish the next model on its gates alone"
    if not pointer.is_file():
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} is not a regular file{fix}")
    try:
        version = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} cannot be read ({exc}){fix}") from exc
    if not version:
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} is empty{fix}")
    if "/" in version or version.startswith(".") or not (registry / dataset / version).is_dir():
        raise ChampionUnreadable(f"{dataset}: production pointer {pointer} names version {version!r}, "
                                 f"which is not a folder of {registry / dataset}{fix}")
    return version


def list_versions(registry: Path, dataset: str) -> list[str]:
    root = Path(registry) / dataset
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != POINTER)


def is_complete_version(path: Path) -> bool:
    return all((path / name).is_file() for name in artifacts.VERSION_FILES)


def set_production(registry: Path, dataset: str, version: str) -> None:
    """Point production at ``version`` with one atomic rename."""
    storage.write_text(Path(registry) / dataset / POINTER, f"{version}\n")


def remove_stale_staging(registry: Path, dataset: str) -> None:
    """Staging folders and temporaries left by a killed publisher are never visible; clear them (under the lock)."""
    root = Path(registry) / dataset
    for stale in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    storage.remove_stale_temporaries(root)


@contextlib.contextmanager
def dataset_lock(registry: Path, dataset: str) -> Iterator[str]:
    """The publish lock of one dataset of a folder registry (server-wide when a Prefect server is configured)."""
    with publish_lock(lambda: folder_identity(registry), dataset, Path(registry) / dataset) as how:
        yield how


class FolderRegistry:
    """Versions as folders, production as a one-line pointer file; the embedded default."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def __repr__(self) -> str:
        return f"FolderRegistry({self.root})"

    def lock(self, dataset: str):
        return dataset_lock(self.root, dataset)

    def production(self, dataset: str) -> str | None:
        return read_production(self.root, dataset)

    def champion_profile(self, dataset: str, dest_dir: Path | None = None) -> Path | None:
        """The production version's stored data profile (in place), if there is a production version with one."""
        version = read_production(self.root, dataset)
        return self.version_profile(dataset, version) if version else None

    def version_profile(self, dataset: str, version: str, dest_dir: Path | None = None) -> Path | None:
        """A version's stored data profile (in place), if it has one."""
        path = self.root / dataset / version / artifacts.PROFILE_FILE
        return path if path.is_file() else None

    def load_version(self, dataset: str, version: str) -> tuple[str, Any]:
        """(model file, loaded Keras model) of a version; FileNotFoundError naming the file if it is gone."""
        path = self.root / dataset / version / artifacts.MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{dataset}: version {version}'s model file {path} does not exist")
        return str(path), load_model(path)

    def canary_batch(self, dataset: str, version: str, dest_dir: Path | None = None) -> Path | None:
        """The version's ``canary.npz`` (in place), if it has one."""
        path = self.root / dataset / version / artifacts.CANARY_FILE
        return path if path.is_file() else None

    def champion_predictions(self, dataset: str, champion: str, pixels: np.ndarray) -> np.ndarray:
        model_path = self.root / dataset / champion / artifacts.MODEL_FILE
        fix = champion_fix_hint(str(self.root / dataset / POINTER))
        if not model_path.is_file():
            raise ChampionUnreadable(f"{dataset}: champion {champion}'s model file {model_path} is missing{fix}")
        return scored_champion(dataset, champion, f"file {model_path}", pixels,
                               lambda x: predict_classes(model_path, x), fix)

    def publish(self, candidate: Candidate, promotion: PromotionDecision, documents: dict[str, bytes]) -> Published:
        """Write the complete version folder, then move the pointer to it (caller holds the lock), fenced: the
        pointer must still name the champion ``promotion`` compared against, or nothing becomes visible."""
        dataset = candidate.dataset
        remove_stale_staging(self.root, dataset)
        root = self.root / dataset
        final = root / candidate.version
        if final.exists():
            raise FileExistsError(f"{final} already exists; versions are never overwritten")
        staging = root / f"{STAGING_PREFIX}{candidate.version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        storage.copy_file(candidate.model_path, staging / artifacts.MODEL_FILE)
        for name, src in candidate.files.items():
            if Path(src).is_file():
                storage.copy_file(src, staging / name)
        for name, data in documents.items():
            storage.write_bytes(staging / name, data)
        storage.fsync_dir(staging)
        first = not list_versions(self.root, dataset)
        self._fence(candidate, promotion, hide=staging)
        staging.rename(final)
        storage.fsync_dir(root)
        if first:  # the dataset folder's own entry in the registry must survive a power cut too
            storage.fsync_dir(self.root)
        self._fence(candidate, promotion, hide=final)
        set_production(self.root, dataset, candidate.version)
        return Published(dataset, candidate.version, final, promotion, location=str(final))

    def _fence(self, candidate: Candidate, promotion: PromotionDecision, hide: Path) -> None:
        """Refuse (and take ``hide`` out of sight: a staging name first, so no torn version is ever visible) if
        the pointer moved since the champion comparison."""
        pointer = self.root / candidate.dataset / POINTER
        try:
            check_fence(candidate.dataset, candidate.version, promotion.champion_version,
                        read_production(self.root, candidate.dataset), str(pointer))
        except (PublishConflict, ChampionUnreadable):
            if not hide.name.startswith(STAGING_PREFIX):  # already visible: out of sight first, then removed
                hide = hide.rename(hide.with_name(f"{STAGING_PREFIX}{hide.name}-refused"))
            shutil.rmtree(hide, ignore_errors=True)
            raise

    def record_unpublished(self, candidate: Candidate, promotion: PromotionDecision | None, decision: str,
                           reason: str, documents: dict[str, bytes]) -> str | None:
        """The folder registry keeps published versions only; the run's folder holds the rest."""
        return None

    def record_history(self, candidate: Candidate, outcome: Outcome, seconds: float, reason: str | None = None,
                       stage: Stage | None = None, published: Published | None = None) -> None:
        """One line in ``<dataset>/runs.jsonl`` and a fresh trend plot (``tasks.registry.run_log``), under the lock."""
        with self.lock(candidate.dataset):
            run_log.record_run(self.root, candidate.dataset, candidate.version, outcome, candidate.metrics,
                               candidate.decision, candidate.drift, seconds, reason=reason, stage=stage,
                               promotion=published.promotion if published else None,
                               canary=published.canary if published else None)

    def record_failure(self, dataset: str, version: str, stage: Stage, reason: str,
                       validation_report: Path | None = None, drift: dict[str, float] | None = None) -> None:
        """A run that stopped before training (download, validation): its line in the run log, under the lock."""
        with self.lock(dataset):
            run_log.record_run(self.root, dataset, version, Outcome.FAILED, reason=reason, stage=stage, drift=drift)

    def has_version(self, dataset: str, version: str) -> bool:
        return "/" not in version and not version.startswith(".") and (self.root / dataset / version).is_dir()

    def production_history(self, dataset: str) -> list[str]:
        return run_log.production_history(run_log.read_run_log(self.root, dataset))

    def move_production(self, dataset: str, version: str, compared: str | None) -> None:
        """Point production at an existing ``version`` (caller holds the lock), fenced like a publish."""
        check_fence(dataset, version, compared, read_production(self.root, dataset),
                    str(self.root / dataset / POINTER))
        set_production(self.root, dataset, version)

    def pin(self, dataset: str) -> Pin | None:
        path = self.root / dataset / artifacts.PIN_FILE
        return Pin.model_validate_json(path.read_text()) if path.is_file() else None

    def set_pin(self, dataset: str, pin: Pin | None) -> None:
        path = self.root / dataset / artifacts.PIN_FILE
        if pin is None:
            path.unlink(missing_ok=True)
        else:
            storage.write_text(path, pin.model_dump_json(indent=2))

    def record_operation(self, dataset: str, outcome: Outcome, version: str, from_version: str | None,
                         reason: str | None, requested_by: str) -> None:
        run_log.record_operation(self.root, dataset, outcome, version, from_version, reason, requested_by)

    def prune(self, dataset: str, protected: set[str | None], policy: RetentionPolicy | None = None) -> None:
        """Retention after a publish: never the production version, nor any of ``protected``."""
        with self.lock(dataset):
            prune_versions(self.root, dataset, list_versions(self.root, dataset),
                           {read_production(self.root, dataset), *protected} - {None}, policy)


