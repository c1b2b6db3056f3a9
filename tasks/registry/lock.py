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
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
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


def limit_name(identity: str, dataset: str) -> str:
    """One global concurrency limit per (registry, dataset); names allow letters, digits, - and _. ``identity``
    names the registry whatever its spelling on a machine (``folder_identity``, ``url_identity``)."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{LIMIT_PREFIX}-{re.sub(r'[^A-Za-z0-9_-]', '_', dataset)}-{digest}"


IDENTITY_FILE = ".registry-id"


def folder_identity(root: Path) -> str:
    """A folder registry's identity: the id written in it when first used, so two machines that mount it at
    different paths (or spell the path differently) take the same publish lock."""
    path = Path(root) / IDENTITY_FILE
    try:
        return "folder:" + path.read_text().strip()
    except FileNotFoundError:
        pass
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another run created it first: its id stands
        return "folder:" + wait_for_id(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(uuid.uuid4().hex + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return "folder:" + path.read_text().strip()


def wait_for_id(path: Path, seconds: float = 10.0) -> str:
    """The id another process is writing (created, maybe not yet written)."""
    deadline = time.monotonic() + seconds
    while not (text := path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not text:
        raise PublishLockUnsafe(f"{path} is empty: the registry's identity (its publish lock's name) is unknown; "
                                "delete the empty file and publish again")
    return text


def url_identity(url: str) -> str:
    """A registry URL as one server is named however it is spelled: scheme and host in lower case, the
    default port made explicit, no credentials, query or trailing slash."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


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
def publish_lock(identity: Callable[[], str], dataset: str, local_folder: Path) -> Iterator[str]:
    """Serialise publishing of ``dataset`` to the registry named by ``identity()`` (called only when a Prefect
    server is configured); yields which locks were taken, for the log."""
    local = f"file lock {local_folder / LOCK_FILE}"
    if server_configured():
        name = limit_name(identity(), dataset)
        with server_lock(name, dataset), file_lock(local_folder):
            yield f"Prefect global concurrency limit {name} and {local}"
    else:
        with file_lock(local_folder):
            yield local
