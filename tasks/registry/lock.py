"""One publisher at a time per dataset and registry: the Prefect server's lock when there is a server.

The champion comparison and the move of the production pointer must not interleave between two runs,
wherever they run. With a Prefect server configured (``PREFECT_API_URL``), the lock is a global
concurrency limit of one slot on that server, so runs on different machines queue for it; its lease is
renewed while the holder lives and expires if the holder dies. Without a server (a local run on
Prefect's temporary server), an ``flock`` on a file in the registry folder serialises runs on this machine
and is released by the OS if the process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

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


def ensure_one_slot_limit(name: str) -> None:
    """Create the limit ``name`` with one slot unless it exists (two runs may race to create it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


@contextlib.contextmanager
def server_lock(name: str, timeout_s: float = ACQUIRE_TIMEOUT_S) -> Iterator[None]:
    """Hold the one slot of the Prefect global concurrency limit ``name`` (created if missing)."""
    from prefect.concurrency.sync import concurrency

    ensure_one_slot_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=LEASE_SECONDS):
        yield


@contextlib.contextmanager
def publish_lock(registry: str, dataset: str, local_folder: Path) -> Iterator[str]:
    """Serialise publishing of ``dataset`` to ``registry``; yields which lock was taken, for the log."""
    if server_configured():
        name = limit_name(registry, dataset)
        with server_lock(name):
            yield f"Prefect global concurrency limit {name}"
    else:
        with file_lock(local_folder):
            yield f"file lock {local_folder / LOCK_FILE}"
