"""Stage 1: fetch a split's file from a mirror into the raw cache, verified and atomically renamed."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from prefect import task
from prefect.tasks import exponential_backoff

from tasks.caching import DOWNLOAD_CACHE
from tasks.datasets import DatasetSpec, Split

CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """A transient failure (network, short read): worth retrying."""


class ChecksumMismatch(Exception):
    """The bytes are not the pinned ones: retrying will not help."""


class SourceNotFound(Exception):
    """The mirror has no such file (HTTP 404, missing path): retrying will not help."""


@dataclass(frozen=True)
class RawFile:
    """A downloaded, verified file in the raw cache."""

    path: Path
    sha256: str
    size: int
    location: str
    fetched: bool  # False when served from the cache


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_location(source: str, relative: str) -> str:
    """Join a split's path to the mirror; absolute URLs and paths stand on their own."""
    if urllib.parse.urlparse(relative).scheme in ("http", "https", "file") or os.path.isabs(relative):
        return relative
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        return urllib.parse.urljoin(source.rstrip("/") + "/", relative)
    return str(Path(source) / relative)


def raw_path(raw_dir: Path, spec: DatasetSpec, split: Split) -> Path:
    name = Path(urllib.parse.urlparse(spec.split(split).path).path).name
    return raw_dir / spec.name / split / name


@contextmanager
def _open_location(location: str, timeout_s: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield a byte stream and its announced length (None when unknown)."""
    scheme = urllib.parse.urlparse(location).scheme
    if scheme in ("http", "https"):
        request = urllib.request.Request(location, headers={"User-Agent": "train-mnist"})
        try:
            response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - scheme checked
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise SourceNotFound(f"{location}: HTTP {exc.code} {exc.reason}") from exc
            raise DownloadError(f"{location}: HTTP {exc.code} {exc.reason}") from exc
        except TimeoutError as exc:
            raise DownloadError(f"{location}: no response within {timeout_s} s") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, bad reply
            raise DownloadError(f"{location}: {exc!r}") from exc
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length is not None else None
        return
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path)) if scheme == "file" else Path(location)
    if not path.is_file():
        raise SourceNotFound(f"{location}: no such file")
    with open(path, "rb") as fh:
        yield fh, path.stat().st_size


def _stream_to(stream: BinaryIO, dest: BinaryIO, location: str, length: int | None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        # read1 returns what has arrived rather than waiting for a full chunk, so ``size`` is exact.
        for chunk in iter(lambda: stream.read1(CHUNK_BYTES), b""):
            digest.update(chunk)
            dest.write(chunk)
            size += len(chunk)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, cut chunked bodies
        of = f" of {length}" if length is not None else ""
        raise DownloadError(f"{location}: transfer broke after {size}{of} bytes: {exc!r}") from exc
    return digest.hexdigest(), size


def fetch_file(location: str, dest: Path, expected_sha256: str | None, timeout_s: float = 30.0) -> RawFile:
    """Download ``location`` to ``dest`` unless a file with the pinned checksum is already there.

    Bytes go to a temporary name in the same folder and are renamed into place only once their
    length and checksum are verified, so ``dest`` never holds a partial or unverified file.
    """
    if expected_sha256 and dest.is_file() and sha256_of(dest) == expected_sha256:
        return RawFile(dest, expected_sha256, dest.stat().st_size, location, fetched=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
    try:
        with _open_location(location, timeout_s) as (stream, length), open(partial, "wb") as out:
            found_sha256, size = _stream_to(stream, out, location, length)
            out.flush()
            os.fsync(out.fileno())
        if length is not None and size != length:
            raise DownloadError(f"{location}: got {size} bytes, expected {length} (Content-Length)")
        if expected_sha256 and found_sha256 != expected_sha256:
            # Without an announced length a cut transfer looks like wrong bytes; say so rather than guess.
            hint = "" if length is not None else "; the server announced no length, so it may have been cut short"
            raise ChecksumMismatch(
                f"{location}: SHA-256 mismatch: expected {expected_sha256}, found {found_sha256} ({size} bytes{hint})"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return RawFile(dest, found_sha256, size, location, fetched=True)


def download_split(spec: DatasetSpec, split: Split, source: str, raw_dir: Path, timeout_s: float = 30.0) -> RawFile:
    """Fetch one split of ``spec`` from the mirror ``source`` into ``raw_dir``."""
    entry = spec.split(split)
    location = resolve_location(source, entry.path)
    return fetch_file(location, raw_path(raw_dir, spec, split), entry.sha256, timeout_s)


def is_retryable(exc: BaseException | None) -> bool:
    """Network trouble is retried; wrong bytes and missing files are not."""
    return isinstance(exc, DownloadError)


# ---- Prefect wrapper -----------------------------------------------------------------------------


def _retry_on_network_errors(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_retryable(exc)
    return False


@task(name="download", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=_retry_on_network_errors, task_run_name="download-{spec.name}-{split}",
      cache_policy=DOWNLOAD_CACHE, persist_result=True)
def download_task(spec: DatasetSpec, split: Split, source: str, raw_dir: Path, timeout_s: float) -> RawFile:
    from prefect import get_run_logger

    raw = download_split(spec, split, source, raw_dir, timeout_s)
    verb = "fetched" if raw.fetched else "cached"
    pinned = "verified against pin" if spec.split(split).sha256 else "recorded (no pin)"
    get_run_logger().info("%s %s (%d bytes, sha256 %s %s)", verb, raw.path, raw.size, raw.sha256[:12], pinned)
    return raw
