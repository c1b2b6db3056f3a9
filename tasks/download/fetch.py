"""Stage 1: fetch a split's file from a mirror into the raw cache, verified and atomically renamed.

Each attempt has a deadline covering the whole request (``tasks.download.transport`` opens locations: redirects,
credentials, the deadline on every read), each file a total deadline across its attempts, and a maximum
size. Network trouble is retried; answers that will not change (404/410, 400/401/403, refused or looping
redirects, TLS certificate errors, a file over the size limit, wrong bytes) are not. Locations are shown
redacted.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.parse
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from prefect import task
from prefect.tasks import exponential_backoff

from tasks import storage
from tasks.datasets import DatasetSpec, Split
from tasks.download.locations import redact, resolve
from tasks.download.transport import DeadlinePassed, DownloadError, DownloadRefused, SourceNotFound, open_location
from tasks.orchestration.caching import DOWNLOAD_CACHE
from tasks.results import RawFile
from tasks.settings import (
    DOWNLOAD_DEADLINE_S,
    DOWNLOAD_MAX_BYTES,
    DOWNLOAD_RETRIES,
    DOWNLOAD_RETRY_BACKOFF_S,
    DOWNLOAD_TIMEOUT_S,
    DOWNLOAD_TOTAL_DEADLINE_S,
)
from tasks.vocabulary import Stage, StageFailure

__all__ = ["ChecksumMismatch", "DownloadError", "DownloadRefused", "SourceNotFound", "download_split",
           "download_task", "fetch_file", "retry_delays"]

PARTIAL_SUFFIX = ".partial"
ORIGIN_SUFFIX = ".origin.json"


class ChecksumMismatch(StageFailure):
    """The bytes are not the pinned ones: retrying will not help."""
    stage = Stage.DOWNLOAD


def resolve_location(source: str, relative: str, dataset: str = "?") -> str:
    """Join a split's path to the mirror; refuses paths that leave it (see ``tasks.download.locations``)."""
    return resolve(dataset, source, relative)


def raw_path(raw_dir: Path, spec: DatasetSpec, split: Split) -> Path:
    name = Path(urllib.parse.urlparse(spec.split(split).path).path).name
    return raw_dir / spec.name / split / name


def _stream_to(stream: BinaryIO, dest: BinaryIO, shown: str, length: int | None, deadline: float,
               deadline_s: float, max_bytes: int) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        # read1 returns what has arrived rather than waiting for a full chunk, so ``size`` is exact.
        for chunk in iter(lambda: stream.read1(storage.CHUNK_BYTES), b""):
            digest.update(chunk)
            dest.write(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise DownloadRefused(f"{shown}: more than the size limit of {max_bytes} bytes; stopped")
            if time.monotonic() > deadline:
                raise DeadlinePassed
    except DeadlinePassed:
        of = f" of {length}" if length is not None else ""
        raise DownloadError(f"{shown}: not complete within the deadline of {deadline_s:g} s "
                            f"({size}{of} bytes received)") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, cut chunked bodies
        of = f" of {length}" if length is not None else ""
        raise DownloadError(f"{shown}: transfer broke after {size}{of} bytes: {exc!r}") from None
    return digest.hexdigest(), size


def _origin_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{ORIGIN_SUFFIX}")


def _write_origin(dest: Path, location: str, sha256: str, fetched_at: str) -> None:
    storage.write_json(_origin_path(dest), {"location": location, "sha256": sha256, "fetched_at": fetched_at})


def _read_origin(dest: Path, sha256: str) -> tuple[str, str | None]:
    """Where and when the cached bytes were fetched, as recorded at download (if they are the same bytes)."""
    try:
        origin = json.loads(_origin_path(dest).read_text())
        if origin.get("sha256") == sha256:
            return str(origin["location"]), origin.get("fetched_at")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "unknown (already in the raw cache, fetched by an earlier version of train-mnist)", None


def fetch_file(location: str, dest: Path, expected_sha256: str | None, timeout_s: float = DOWNLOAD_TIMEOUT_S,
               deadline_s: float = DOWNLOAD_DEADLINE_S, max_bytes: int = DOWNLOAD_MAX_BYTES) -> RawFile:
    """Download ``location`` to ``dest`` unless a file with the pinned checksum is already there.

    Bytes go to a temporary name in the same folder and are renamed into place only once their
    length and checksum are verified, so ``dest`` never holds a partial or unverified file. Temporary
    files of killed runs are removed first; those of running ones are locked and left alone.
    """
    shown = redact(location)
    if expected_sha256 and dest.is_file() and storage.sha256_file(dest) == expected_sha256:
        origin, fetched_at = _read_origin(dest, expected_sha256)
        return RawFile(dest, expected_sha256, dest.stat().st_size, origin, False, fetched_at, shown)
    dest.parent.mkdir(parents=True, exist_ok=True)
    storage.remove_stale_temporaries(dest.parent, f".{dest.name}.", PARTIAL_SUFFIX)
    deadline = time.monotonic() + deadline_s
    fetched_at = datetime.now(UTC).isoformat(timespec="seconds")
    with open_location(location, deadline, deadline_s, min(timeout_s, deadline_s)) as opened, \
            storage.atomic_path(dest, suffix=PARTIAL_SUFFIX) as partial, open(partial, "wb") as out:
        stream, length, came_from = opened.stream, opened.length, opened.final_location
        if length is not None and length > max_bytes:
            raise DownloadRefused(f"{shown}: announces {length} bytes, more than the size limit of "
                                  f"{max_bytes} bytes")
        found_sha256, size = _stream_to(stream, out, shown, length, deadline, deadline_s, max_bytes)
        if length is not None and size != length:
            raise DownloadError(f"{shown}: got {size} bytes, expected {length} (Content-Length)")
        if expected_sha256 and found_sha256 != expected_sha256:
            # Without an announced length a cut transfer looks like wrong bytes; say so rather than guess.
            hint = "" if length is not None else "; the server announced no length, so it may have been cut short"
            raise ChecksumMismatch(f"{shown}: SHA-256 mismatch: expected {expected_sha256}, found "
                                   f"{found_sha256} ({size} bytes{hint})")
        _write_origin(dest, came_from, found_sha256, fetched_at)
    return RawFile(dest, found_sha256, size, came_from, True, fetched_at, shown)


def download_split(spec: DatasetSpec, split: Split, source: str, raw_dir: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S,
                   deadline_s: float = DOWNLOAD_DEADLINE_S, max_bytes: int = DOWNLOAD_MAX_BYTES) -> RawFile:
    """Fetch one split of ``spec`` from the mirror ``source`` into ``raw_dir``."""
    entry = spec.split(split)
    location = resolve(spec.name, source, entry.path)
    raw = fetch_file(location, raw_path(raw_dir, spec, split), entry.sha256, timeout_s, deadline_s, max_bytes)
    return replace(raw, split=split)


def is_retryable(exc: BaseException | None) -> bool:
    """Network trouble is retried; wrong bytes, missing files and permanent refusals are not."""
    return isinstance(exc, DownloadError)


# ---- Prefect wrapper -----------------------------------------------------------------------------


RETRY_JITTER = 0.5  # each delay varies by up to +-50 %: mirrors hit by many workers at once are not hit in step


def retry_delays(retries: int, backoff_s: float) -> list[float]:
    """Prefect's exponential backoff: b, 2b, 4b, ... seconds before each retry (jittered by ``RETRY_JITTER``)."""
    return exponential_backoff(backoff_factor=backoff_s)(retries)


def _retry_on_network_errors(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_retryable(exc)
    return False


class FileDeadline:
    """One file's total deadline across all its attempts (retries and the waits between them included).

    Prefect retries a task in the process that ran it, so the first attempt's start is kept per task run.
    """

    _first_attempt: dict[str, float] = {}

    def __init__(self, key: str, total_s: float):
        self.total_s = total_s
        self.started = self._first_attempt.setdefault(key, time.monotonic())

    def remaining(self) -> float:
        return self.total_s - (time.monotonic() - self.started)

    def spent(self, shown: str, attempts: int, last: BaseException | None = None) -> DownloadRefused:
        why = f"; last attempt: {last}" if last is not None else ""
        return DownloadRefused(f"{shown}: not downloaded within its total deadline of {self.total_s:g} s "
                               f"(TRAIN_MNIST_DOWNLOAD_TOTAL_DEADLINE_S) after {attempts} attempt(s); "
                               f"gave up{why}")


@task(name="download", retries=DOWNLOAD_RETRIES,
      retry_delay_seconds=retry_delays(DOWNLOAD_RETRIES, DOWNLOAD_RETRY_BACKOFF_S), retry_jitter_factor=RETRY_JITTER,
      retry_condition_fn=_retry_on_network_errors, task_run_name="download-{spec.name}-{split}",
      cache_policy=DOWNLOAD_CACHE, persist_result=True)
def download_task(spec: DatasetSpec, split: Split, source: str, raw_dir: Path, timeout_s: float,
                  deadline_s: float = DOWNLOAD_DEADLINE_S, max_bytes: int = DOWNLOAD_MAX_BYTES,
                  total_deadline_s: float = DOWNLOAD_TOTAL_DEADLINE_S) -> RawFile:
    """``download_split`` with retries on network errors, each attempt inside what is left of the file's total
    deadline; once that is spent, the download fails for good, naming the file and the limit."""
    from prefect import get_run_logger
    from prefect.runtime import task_run

    budget = FileDeadline(str(task_run.id), total_deadline_s)
    shown = redact(resolve(spec.name, source, spec.split(split).path))
    if budget.remaining() <= 0:
        raise budget.spent(shown, task_run.run_count - 1)
    try:
        raw = download_split(spec, split, source, raw_dir, timeout_s, min(deadline_s, budget.remaining()), max_bytes)
    except DownloadError as exc:
        if budget.remaining() <= 0:
            raise budget.spent(shown, task_run.run_count, exc) from None
        raise
    pinned = "verified against pin" if spec.split(split).sha256 else "recorded (no pin)"
    logger = get_run_logger()
    if raw.fetched:
        logger.info("fetched %s from %s (%d bytes, sha256 %s %s)", raw.path, raw.location, raw.size,
                    raw.sha256[:12], pinned)
    else:
        logger.info("used the verified cached copy %s (%d bytes, sha256 %s %s; fetched from %s at %s); "
                    "source %s was not contacted", raw.path, raw.size, raw.sha256[:12], pinned, raw.location,
                    raw.fetched_at or "an unknown time", raw.requested)
    return raw
