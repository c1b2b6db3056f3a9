"""The download stage on a flaky network: transient faults are retried with backoff, permanent ones fail fast
and clearly, and no partial or unverified file ever sits under its final name in the raw cache.

A real HTTP server on 127.0.0.1 (tests/support/fault_server.py) answers each request with a planned fault; it
records every request, so attempts are counted where they happen. Retries are Prefect's: the download
task runs inside a small flow with the retry settings the train flow passes (a list of delays).
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow

from tasks.datasets import DatasetSpec
from tasks.download.fetch import (
    RETRY_JITTER,
    ChecksumMismatch,
    DownloadError,
    RawFile,
    SourceNotFound,
    download_task,
    fetch_file,
    is_retryable,
    raw_path,
)
from tests.support.fault_server import (
    ChunkedCut,
    Fault,
    FaultServer,
    Redirect,
    Reset,
    ShortBody,
    Stall,
    Status,
    UnannouncedShortBody,
    WrongBytes,
    partial_files,
)
from tests.support.slices import TINY_TRAIN

PATH = TINY_TRAIN
DELAYS = [0.1, 0.2, 0.4]  # the doubling backoff flows/train.py configures, scaled down
TIMEOUT_S = 0.5


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def server(tiny_mirror) -> Iterator[FaultServer]:
    with FaultServer(tiny_mirror) as srv:
        yield srv
    assert srv.errors == [], f"the fault server itself failed: {srv.errors}"


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    return tmp_path / "raw"


@flow(name="download-on-a-flaky-network")
def download_with_retries(spec: DatasetSpec, source: str, raw_dir: Path, retries: int, delays: list[float],
                          timeout_s: float = TIMEOUT_S) -> RawFile:
    """The download step of flows/train.py, with the test's retry settings."""
    download = download_task.with_options(retries=retries, retry_delay_seconds=delays[:retries] or 0)
    return download(spec, "train", source, raw_dir, timeout_s)


def gaps(server: FaultServer) -> list[float]:
    times = [hit.at for hit in server.hits(PATH)]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def assert_cache_clean(raw_dir: Path, dest: Path, previous: bytes | None = None) -> None:
    """No partial file is left, and ``dest`` is absent or still holds the previous good bytes."""
    assert partial_files(raw_dir) == []
    if previous is None:
        assert not dest.exists(), f"{dest} exists after a failed download"
    else:
        assert dest.read_bytes() == previous, f"{dest} was changed by a failed download"


class CacheWatch:
    """What the raw cache held each time the server was asked, and mid-way through each broken body."""

    def __init__(self, raw_dir: Path, dest: Path) -> None:
        self.raw_dir, self.dest, self.seen = raw_dir, dest, []

    def __call__(self, moment: str, fault: Fault) -> None:
        dest_bytes = self.dest.read_bytes() if self.dest.exists() else None
        self.seen.append((moment, fault.kind, dest_bytes, [p.name for p in partial_files(self.raw_dir)]))


# ---- one attempt: each fault is detected and classified -----------------------------------------------

TRANSIENT: list[tuple[Fault, str]] = [
    (Status(500), "HTTP 500 Internal Server Error"),
    (Status(503), "HTTP 503 Service Unavailable"),
    (Reset(), r"transfer broke after \d+ of \d+ bytes: ConnectionResetError"),
    (ShortBody(), r"got \d+ bytes, expected \d+ \(Content-Length\)"),
    (ChunkedCut(), r"transfer broke after \d+ bytes: IncompleteRead"),
    (Stall(mid_body=False), r"no response within 0\.5 s"),
    (Stall(mid_body=True), r"transfer broke after \d+ of \d+ bytes: TimeoutError"),
]


@pytest.mark.parametrize(("fault", "message"), TRANSIENT, ids=[f.kind for f, _ in TRANSIENT])
def test_a_transient_fault_fails_one_attempt_as_retryable_and_leaves_no_file(server, tiny_spec, raw_dir, fault,
                                                                            message):
    server.plan(PATH, fault)
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(DownloadError, match=message) as info:
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert server.url(PATH) in str(info.value)
    assert is_retryable(info.value)
    assert_cache_clean(raw_dir, dest)
    assert [hit.fault for hit in server.hits(PATH)] == [fault.kind]


def test_connection_refused_is_retryable(tiny_spec, raw_dir):
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(DownloadError, match="Connection refused") as info:
        fetch_file(f"http://127.0.0.1:{port}/{PATH}", dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert is_retryable(info.value)
    assert_cache_clean(raw_dir, dest)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mid_body", [False, True], ids=["before-headers", "mid-body"])
def test_a_stalled_server_is_given_up_on_after_the_timeout_not_waited_for(server, tiny_spec, raw_dir, mid_body):
    server.plan(PATH, Stall(seconds=60, mid_body=mid_body))
    dest = raw_path(raw_dir, tiny_spec, "train")
    started = time.monotonic()
    with pytest.raises(DownloadError):
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < 5, "the 0.5 s timeout did not stop a server that went silent for 60 s"
    assert_cache_clean(raw_dir, dest)


def test_wrong_bytes_name_expected_and_found_checksums_and_are_not_retryable(server, tiny_spec, raw_dir):
    server.plan(PATH, WrongBytes())
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(ChecksumMismatch) as info:
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    served = bytearray((server.directory / PATH).read_bytes())
    served[:64] = bytes(b ^ 0xFF for b in served[:64])
    found = hashlib.sha256(served).hexdigest()
    assert f"expected {tiny_spec.train.sha256}, found {found}" in str(info.value)
    assert not is_retryable(info.value)
    assert_cache_clean(raw_dir, dest)


def test_a_body_cut_short_without_a_length_is_caught_by_the_pin(server, tiny_spec, raw_dir):
    """HTTP/1.0 style: no Content-Length, so only the checksum can tell; the message says it may be cut."""
    server.plan(PATH, UnannouncedShortBody())
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(ChecksumMismatch, match="announced no length, so it may have been cut short"):
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert_cache_clean(raw_dir, dest)


@pytest.mark.parametrize("code", [301, 302, 307])
def test_a_redirect_is_followed_to_the_real_file(server, tiny_mirror, tiny_spec, raw_dir, code):
    server.plan("/old/location.csv.gz", Redirect(f"/{PATH}", code))
    dest = raw_path(raw_dir, tiny_spec, "train")
    raw = fetch_file(server.url("old/location.csv.gz"), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert raw.fetched and raw.sha256 == tiny_spec.train.sha256
    assert dest.read_bytes() == (tiny_mirror / PATH).read_bytes()
    assert [(hit.path, hit.fault) for hit in server.hits()] == [("/old/location.csv.gz", f"Redirect{code}"),
                                                                (f"/{PATH}", "Serve")]
    assert partial_files(raw_dir) == []


def test_a_redirect_to_a_missing_file_is_not_found(server, tiny_spec, raw_dir):
    server.plan("/old/location.csv.gz", Redirect("/moved/away.csv.gz", 301))
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(SourceNotFound, match="HTTP 404"):
        fetch_file(server.url("old/location.csv.gz"), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert_cache_clean(raw_dir, dest)


@pytest.mark.parametrize(("code", "reason"), [(404, "Not Found"), (410, "Gone")])
def test_a_file_the_server_does_not_have_is_not_retryable(server, tiny_spec, raw_dir, code, reason):
    server.plan(PATH, Status(code))
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(SourceNotFound, match=f"{server.url(PATH)}: HTTP {code} {reason}") as info:
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=TIMEOUT_S)
    assert not is_retryable(info.value)
    assert_cache_clean(raw_dir, dest)


def test_a_failed_refetch_keeps_the_previous_good_file(server, tiny_spec, raw_dir):
    """An unpinned split is fetched every run; a broken transfer must not replace the last good copy."""
    unpinned = tiny_spec.model_copy(update={"train": tiny_spec.train.model_copy(update={"sha256": None})})
    dest = raw_path(raw_dir, unpinned, "train")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"previous good bytes")
    for fault in (Reset(), ShortBody(), ChunkedCut(), Stall(mid_body=True)):
        server.plan(PATH, fault)
        with pytest.raises(DownloadError):
            fetch_file(server.url(PATH), dest, None, timeout_s=TIMEOUT_S)
        assert_cache_clean(raw_dir, dest, previous=b"previous good bytes")


# ---- through the Prefect task: retries with backoff, then success or a clear failure ------------------

# Each flow run meets several faults in a row (one per attempt), which keeps the Prefect runs few.
RECOVERABLE: list[tuple[str, list[Fault]]] = [
    ("5xx", [Status(503), Status(500), Status(503)]),
    ("broken-bodies", [Reset(), ShortBody(), ChunkedCut()]),
    ("stalls", [Stall(), Stall(mid_body=True)]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("faults", [f for _, f in RECOVERABLE], ids=[name for name, _ in RECOVERABLE])
def test_transient_faults_are_retried_with_backoff_until_the_download_succeeds(prefect_api, server, tiny_spec,
                                                                               tiny_mirror, raw_dir, faults):
    server.plan(PATH, *faults)
    dest = raw_path(raw_dir, tiny_spec, "train")
    watch = server.observe = CacheWatch(raw_dir, dest)

    raw = download_with_retries(tiny_spec, server.base_url, raw_dir, retries=3, delays=DELAYS)

    assert raw.fetched and raw.path == dest and raw.sha256 == tiny_spec.train.sha256
    assert dest.read_bytes() == (tiny_mirror / PATH).read_bytes()
    assert partial_files(raw_dir) == []
    assert [hit.fault for hit in server.hits(PATH)] == [f.kind for f in faults] + ["Serve"]
    # Each retry waited at least its delay (0.1 s, then 0.2 s, then 0.4 s), less the jitter that keeps many
    # workers from retrying in step (up to RETRY_JITTER of it).
    for gap, delay in zip(gaps(server), DELAYS, strict=False):
        shortest = delay * (1 - RETRY_JITTER) * 0.9
        assert gap >= shortest, f"retry came {gap:.3f} s after the failure, before its jittered {delay} s delay"
    # While the attempts failed, nothing stood under the final name and no partial file lingered.
    for moment, kind, dest_bytes, partials in watch.seen:
        assert dest_bytes is None, f"{dest} existed at {moment} of a {kind} attempt"
        if moment == "request":
            assert partials == [], f"{partials} left over when the {kind} attempt started"


@pytest.mark.timeout(60)
def test_a_server_that_always_fails_gives_up_after_retries_plus_one_attempts(prefect_api, server, tiny_spec,
                                                                             raw_dir):
    server.plan(PATH, then=Status(503))
    dest = raw_path(raw_dir, tiny_spec, "train")
    started = time.monotonic()
    with pytest.raises(DownloadError, match=f"{server.url(PATH)}: HTTP 503 Service Unavailable"):
        download_with_retries(tiny_spec, server.base_url, raw_dir, retries=2, delays=DELAYS)
    assert len(server.hits(PATH)) == 2 + 1
    assert time.monotonic() - started < 30
    assert_cache_clean(raw_dir, dest)


@pytest.mark.timeout(60)
def test_a_server_that_always_stalls_fails_within_the_timeouts(prefect_api, server, tiny_spec, raw_dir):
    server.plan(PATH, then=Stall(seconds=60, mid_body=True))
    dest = raw_path(raw_dir, tiny_spec, "train")
    watch = server.observe = CacheWatch(raw_dir, dest)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="TimeoutError"):
        download_with_retries(tiny_spec, server.base_url, raw_dir, retries=1, delays=DELAYS)
    # two 0.5 s timeouts and one 0.1 s delay, plus Prefect's own bookkeeping; not the server's 60 s
    assert time.monotonic() - started < 20
    assert len(server.hits(PATH)) == 1 + 1
    assert_cache_clean(raw_dir, dest)
    assert all(dest_bytes is None for _, _, dest_bytes, _ in watch.seen)


PERMANENT: list[tuple[str, Fault, type[Exception], str]] = [
    ("wrong-bytes", WrongBytes(), ChecksumMismatch, "SHA-256 mismatch: expected "),
    ("404", Status(404), SourceNotFound, "HTTP 404 Not Found"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "error", "message"), [p[1:] for p in PERMANENT], ids=[p[0] for p in PERMANENT])
def test_permanent_faults_fail_at_once_without_retrying(prefect_api, server, tiny_spec, raw_dir, fault, error,
                                                        message):
    server.plan(PATH, then=fault)
    dest = raw_path(raw_dir, tiny_spec, "train")
    with pytest.raises(error, match=message) as info:
        download_with_retries(tiny_spec, server.base_url, raw_dir, retries=3, delays=[5.0, 5.0, 5.0])
    assert server.url(PATH) in str(info.value)
    assert len(server.hits(PATH)) == 1, "a fault that retrying cannot fix was retried"
    assert_cache_clean(raw_dir, dest)


@pytest.mark.timeout(60)
def test_a_verified_file_in_the_cache_is_not_fetched_again_even_when_the_server_is_down(prefect_api, server,
                                                                                       tiny_spec, raw_dir):
    first = download_with_retries(tiny_spec, server.base_url, raw_dir, retries=0, delays=[])
    server.plan(PATH, then=Status(503))
    again = download_with_retries(tiny_spec, server.base_url, raw_dir, retries=3, delays=DELAYS)
    # Served from the content cache (Prefect's record or the verified file): the server saw one request.
    assert first.fetched
    assert again.path == first.path and again.sha256 == tiny_spec.train.sha256
    assert [hit.fault for hit in server.hits(PATH)] == ["Serve"]
