"""Retention: prune old registry versions after a publish, as crash-safely as publishing.

A version is kept if it is among the newest ``keep_last`` versions, or younger than ``keep_days`` days
(its age is read from its name, ``YYYYmmddTHHMMSSZ-xxxxxx``; a folder whose name carries no date is
never pruned), or protected: the production version and the champion the run compared against are
never deleted. Deleting is a rename to a hidden ``.trash-`` name (one atomic step: the version
disappears from ``list_versions`` whole) followed by ``rmtree``; a kill at any point therefore leaves
only complete versions, plus trash that the next prune removes. Call it under the dataset's lock.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tasks import storage
from tasks.orchestration.versions import version_time

KEEP_LAST = 10
KEEP_DAYS = 30
TRASH_PREFIX = ".trash-"


class RetentionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_last: int = Field(default=KEEP_LAST, ge=1, description="Newest versions always kept")
    keep_days: float = Field(default=KEEP_DAYS, ge=0, description="Versions younger than this are kept")


@dataclass(frozen=True)
class Pruned:
    deleted: list[str]
    kept: list[str]


def versions_to_delete(versions: list[str], policy: RetentionPolicy, protected: set[str],
                       now: datetime | None = None) -> list[str]:
    """The versions the policy lets go (``versions`` sorted oldest first, as their names sort)."""
    now = now or datetime.now(UTC)
    newest = set(versions[-policy.keep_last:])
    cutoff = now - timedelta(days=policy.keep_days)
    doomed = []
    for version in versions:
        born = version_time(version)
        if version in newest or version in protected or born is None or born > cutoff:
            continue
        doomed.append(version)
    return doomed


def empty_trash(root: Path) -> None:
    for trash in root.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(trash, ignore_errors=True)


def prune_versions(registry: Path, dataset: str, versions: list[str], protected: set[str],
                   policy: RetentionPolicy | None = None, now: datetime | None = None) -> Pruned:
    """Delete what the policy lets go of ``versions`` (the dataset's visible versions, oldest first)."""
    policy = policy or RetentionPolicy()
    root = registry / dataset
    empty_trash(root)  # left by a prune that was killed
    doomed = versions_to_delete(versions, policy, {p for p in protected if p}, now)
    for version in doomed:
        trash = root / f"{TRASH_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        os.rename(root / version, trash)
        storage.fsync_dir(root)
        shutil.rmtree(trash)
    return Pruned(deleted=doomed, kept=[v for v in versions if v not in doomed])
