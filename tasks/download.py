"""Stage 1: fetch a split's file from a mirror into the raw cache, verified and atomically renamed.

Each file has a total deadline (not only a per-read socket timeout) and a maximum size. Network
trouble is retried; answers that will not change (404/410, 400/401/403, refused or looping redirects,
TLS certificate errors, a file over the size limit, wrong bytes) are not. Locations are shown redacted.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from prefect import task

from tasks import storage
from tasks.caching import DOWNLOAD_CACHE
from tasks.datasets import DatasetSpec, Split
from tasks.locations import URL_SCHEMES, redact, resolve, scheme_of
from tasks.results import RawFile
from tasks.settings import (
    DOWNLOAD_DEADLINE_S,
    DOWNLOAD_MAX_BYTES,
    DOWNLOAD_RETRIES,
    DOWNLOAD_RETRY_BACKOFF_S,
    DOWNLOAD_TIMEOUT_S,
)

PARTIAL_SUFFIX = ".partial"
ORIGIN_SUFFIX = ".origin.json"
MAX_REDIRECTS = 5
PERMANENT_HTTP = (400, 401, 403)


class DownloadError(Exception):
    """A transient failure (network, short read, deadline): worth retrying."""


class ChecksumMismatch(Exception):
    """The bytes are not the pinned ones: retrying will not help."""


class SourceNotFound(Exception):
    """The mirror has no such file (HTTP 404, missing path): retrying will not help."""


class DownloadRefused(Exception):
    """A permanent refusal: 400/401/403, a refused or looping redirect, a bad TLS certificate, a size limit."""


def resolve_location(source: str, relative: str, dataset: str = "?") -> str:
    """Join a split's path to the mirror; refuses paths that leave it (see ``tasks.locations``)."""
    return resolve(dataset, source, relative)


def raw_path(raw_dir: Path, spec: DatasetSpec, split: Split) -> Path:
    name = Path(urllib.parse.urlparse(spec.split(split).path).path).name
    return raw_dir / spec.name / split / name


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s), never from https down to http, at most ``MAX_REDIRECTS`` times."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - stdlib signature
        old, new = scheme_of(req.full_url), scheme_of(newurl)
        if new not in URL_SCHEMES:
            raise DownloadRefused(f"{redact(req.full_url)}: HTTP {code} redirect to {redact(newurl)} refused: "
                                  f"scheme {new or 'none'!r} is not {' or '.join(URL_SCHEMES)}")
        if old == "https" and new == "http":
            raise DownloadRefused(f"{redact(req.full_url)}: HTTP {code} redirect from https to plain http "
                                  f"({redact(newurl)}) refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _request(location: str) -> urllib.request.Request:
    """The request, with credentials of the URL (``user:password@``) sent as Basic auth, not in the URL."""
    parts = urllib.parse.urlsplit(location)
    headers = {"User-Agent": "train-mnist"}
    if parts.username is not None:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        location = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return urllib.request.Request(location, headers=headers)


@contextmanager
def _open_location(location: str, timeout_s: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield a byte stream and its announced length (None when unknown)."""
    shown = redact(location)
    scheme = scheme_of(location)
    if scheme in URL_SCHEMES:
        opener = urllib.request.build_opener(_SafeRedirects())
        try:
            response = opener.open(_request(location), timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise SourceNotFound(f"{shown}: HTTP {exc.code} {exc.reason}") from None
            if exc.code in PERMANENT_HTTP:
                raise DownloadRefused(f"{shown}: HTTP {exc.code} {exc.reason} (not retried)") from None
            if 300 <= exc.code < 400:  # a loop, too many hops, or a target urllib itself refuses
                raise DownloadRefused(f"{shown}: HTTP {exc.code} redirect refused or looping "
                                      f"(at most {MAX_REDIRECTS} redirects, to http(s) only)") from None
            raise DownloadError(f"{shown}: HTTP {exc.code} {exc.reason}") from None
        except TimeoutError as exc:
            raise DownloadError(f"{shown}: no response within {timeout_s} s") from exc
        except ssl.SSLCertVerificationError as exc:
            raise DownloadRefused(f"{shown}: TLS certificate not trusted: {exc.verify_message}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise DownloadRefused(f"{shown}: TLS certificate not trusted: {exc.reason.verify_message}") from None
            raise DownloadError(f"{shown}: {exc.reason!r}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, bad reply
            raise DownloadError(f"{shown}: {exc!r}") from None
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length is not None and length.isdigit() else None
        return
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path)) if scheme == "file" else Path(location)
    if not path.is_file():
        raise SourceNotFound(f"{shown}: no such file")
    with open(path, "rb") as fh:
        yield fh, path.stat().st_size


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
                of = f" of {length}" if length is not None else ""
                raise DownloadError(f"{shown}: not complete within the deadline of {deadline_s:g} s "
                                    f"({size}{of} bytes received)")
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
    with _open_location(location, min(timeout_s, deadline_s)) as (stream, length), \
            storage.atomic_path(dest, suffix=PARTIAL_SUFFIX) as partial, open(partial, "wb") as out:
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
        _write_origin(dest, shown, found_sha256, fetched_at)
    return RawFile(dest, found_sha256, size, shown, True, fetched_at, shown)


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


def retry_delays(retries: int, backoff_s: float) -> list[float]:
    """Exponential backoff: b, 2b, 4b, ... seconds before each retry."""
    return [backoff_s * 2**i for i in range(retries)]


def _retry_on_network_errors(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_retryable(exc)
    return False


@task(name="download", retries=DOWNLOAD_RETRIES,
      retry_delay_seconds=retry_delays(DOWNLOAD_RETRIES, DOWNLOAD_RETRY_BACKOFF_S),
      retry_condition_fn=_retry_on_network_errors, task_run_name="download-{spec.name}-{split}",
      cache_policy=DOWNLOAD_CACHE, persist_result=True)
def download_task(spec: DatasetSpec, split: Split, source: str, raw_dir: Path, timeout_s: float,
                  deadline_s: float = DOWNLOAD_DEADLINE_S, max_bytes: int = DOWNLOAD_MAX_BYTES) -> RawFile:
    from prefect import get_run_logger

    raw = download_split(spec, split, source, raw_dir, timeout_s, deadline_s, max_bytes)
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
