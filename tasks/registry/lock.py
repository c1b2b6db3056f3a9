"""One publisher at a time per dataset and registry, whatever the mode a run is in.

The champion comparison and the move of the production pointer must not interleave between two runs,
wherever they run. Every publisher takes an ``flock`` on a file of the registry folder (a folder registry)
or of this machine (an MLflow registry): it serialises every run on this machine, with or without a
Prefect server, and the OS releases it if the process dies. With a Prefect server configured
(``PREFECT_API_URL``), a publisher first takes that server's global concurrency limit of one slot too, so
runs on different machines queue for it; its lease is renewed while the holder lives and expires if the
holder dies. A limit that is inactive or has more than one slot would hold nothing while the log said
the lock was taken, so publishing is refused until it is active with limit 1. A holder whose lease lapsed
(a paused process) is stopped by the registry's fence instead: the pointer only moves if it still names
the champion this run compared against (``tasks.registry.interface.PublishConflict``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from tasks.vocabulary import Stage, StageFailure

LOCK_FILE = ".lock"
LIMIT_PREFIX = "train-mnist-publish"
LEASE_SECONDS = 60.0  # how long a dead holder keeps the slot; renewed well before it runs out while alive
ACQUIRE_TIMEOUT_S = 3600.0  # a publish takes seconds; waiting an hour means something is stuck


def server_configured() -> bool:
    """True when runs report to a Prefect server (not Prefect's temporary per-process one)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def limit_name(registry: str, dataset: str) -> str:
    """One global concurrency limit per (registry, dataset); names allow letters, digits, - and _."""
    digest = hashlib.sha256(registry.encode()).hexdigest()[:12]
    return f"{LIMIT_PREFIX}-{re.sub(r'[^A-Za-z0-9_-]', '_', dataset)}-{digest}"


@contextlib.contextmanager
def file_lock(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``folder/.lock``; released by the OS if the process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class PublishLockUnsafe(StageFailure, RuntimeError):
    """The server's publish limit would not exclude another publisher; nothing was published."""
    stage = Stage.PUBLISH


def one_slot_limit(name: str):
    """The limit ``name``, created with one slot if missing (two runs may race to create it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
            return client.read_global_concurrency_limit_by_name(name)


def check_one_slot(limit, dataset: str) -> None:
    """Refuse a limit that would let two publishers in (inactive, or more than one slot), naming it."""
    if limit.active and limit.limit == 1:
        return
    state = "inactive" if not limit.active else f"set to {limit.limit} slots"
    raise PublishLockUnsafe(
        f"{dataset}: the publish lock, Prefect global concurrency limit {limit.name!r}, is {state}, so it would not "
        f"keep two runs from publishing at once; nothing was published. Make it active with limit 1 (the UI's "
        f"Concurrency page, or: prefect global-concurrency-limit update {limit.name} --enable --limit 1)")


@contextlib.contextmanager
def server_lock(name: str, dataset: str, timeout_s: float = ACQUIRE_TIMEOUT_S) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit ``name`` (created if missing)."""
    from prefect.concurrency.sync import concurrency

    check_one_slot(one_slot_limit(name), dataset)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=LEASE_SECONDS):
        yield


@contextlib.contextmanager
def publish_lock(registry: str, dataset: str, local_folder: Path) -> Iterator[str]:
    """Serialise publishing of ``dataset`` to ``registry``; yields which locks were taken, for the log."""
    local = f"file lock {local_folder / LOCK_FILE}"
    if server_configured():
        name = limit_name(registry, dataset)
        with server_lock(name, dataset), file_lock(local_folder):
            yield f"Prefect global concurrency limit {name} and {local}"
    else:
        with file_lock(local_folder):
            yield local
