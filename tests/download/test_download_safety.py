"""Downloads read nothing outside the source and write nothing secret; they have a deadline and size limits,
permanent failures are not retried, killed runs leave no litter, and a cache hit says where its bytes came from."""

from __future__ import annotations

import fcntl
import ssl
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.datasets import DatasetConfigError, load_datasets_file
from tasks.download.fetch import (
    DownloadError,
    DownloadRefused,
    download_split,
    fetch_file,
    is_retryable,
    raw_path,
)
from tasks.download.locations import LocationError, redact, resolve
from tasks.download.transport import _SafeRedirects
from tasks.settings import Settings
from tests.support.fault_server import FaultServer, Redirect, Status, Trickle, partial_files
from tests.support.slices import TINY_TRAIN

PATH = TINY_TRAIN


@pytest.fixture
def server(tiny_mirror):
    with FaultServer(tiny_mirror) as srv:
        yield srv


def datasets_file(tmp_path: Path, train_path: str) -> Path:
    path = tmp_path / "datasets.toml"
    path.write_text(f'''[[dataset]]
name = "escape"
class_names = ["a", "b"]
train = {{ path = "{train_path}" }}
test = {{ path = "ok/test.csv" }}
gates = {{ min_accuracy = 0.5 }}
''')
    return path


# ---- 1. nothing outside the source is read -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["../outside.csv", "mnist/../../outside.csv", "/etc/passwd", "%2e%2e/secret.csv",
                                 "file:///etc/passwd", "ftp://host/x.csv", "C:\\\\data\\\\x.csv", "~/x.csv"])
def test_a_datasets_file_path_leaving_the_source_is_refused_naming_dataset_and_path(tmp_path, bad):
    with pytest.raises(DatasetConfigError) as info:
        load_datasets_file(datasets_file(tmp_path, bad))
    message = str(info.value)
    assert "dataset escape" in message and ("path" in message)


def test_an_http_source_never_turns_a_slash_path_into_a_local_read(tiny_spec, tmp_path):
    """Before: ``/etc/passwd`` with an HTTP source was read from the local disk and quoted in errors."""
    spec = tiny_spec.model_copy(update={"train": tiny_spec.train.model_copy(update={"path": "/etc/passwd"})})
    with pytest.raises(LocationError, match="dataset mnist: path '/etc/passwd' is absolute") as info:
        download_split(spec, "train", "http://127.0.0.1:9/mirror", tmp_path / "raw")
    assert "root:" not in str(info.value)
    assert not (tmp_path / "raw").exists()


def test_a_symlink_out_of_a_directory_source_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "link.csv").symlink_to("/etc/passwd")
    with pytest.raises(LocationError, match="leaves the source"):
        resolve("ds", str(mirror), "link.csv")


@pytest.mark.parametrize("source", ["ftp://host/mirror", "gopher://x", "javascript:alert(1)"])
def test_a_source_with_another_scheme_is_refused(source):
    with pytest.raises(ValidationError, match="not allowed"):
        Settings(source=source)


def test_credentials_and_tokens_are_redacted():
    assert redact("https://user:s3cret@host:8443/a/b.csv.gz?X-Amz-Signature=abc&t=1") == \
        "https://***@host:8443/a/b.csv.gz?***"
    assert redact("/plain/path.csv") == "/plain/path.csv"


def test_no_secret_reaches_an_error_or_the_raw_files_lineage(server, tiny_spec, tmp_path):
    source = server.base_url.replace("http://", "http://alice:s3cret@") + "?token=t0p"
    raw = download_split(tiny_spec, "train", source, tmp_path / "raw", timeout_s=5)
    assert "s3cret" not in raw.location and "t0p" not in raw.location and "***" in raw.location
    assert "s3cret" not in str(raw.lineage()) and "t0p" not in str(raw.lineage())
    assert server.hits(PATH) and server.errors == []
    server.plan(PATH, Status(503), then=Status(503))
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url(PATH).replace("http://", "http://alice:s3cret@") + "?token=t0p",
                   tmp_path / "other" / "x.csv.gz", None, timeout_s=5)
    assert "s3cret" not in str(info.value) and "t0p" not in str(info.value)


def test_a_redirect_to_another_scheme_is_refused_and_not_retried(server, tiny_spec, tmp_path):
    server.plan("/old.csv.gz", Redirect("file:///etc/passwd"))
    with pytest.raises(DownloadRefused, match="redirect") as info:
        fetch_file(server.url("old.csv.gz"), tmp_path / "x.csv.gz", tiny_spec.train.sha256, timeout_s=5)
    assert not is_retryable(info.value) and "root:" not in str(info.value)


def test_a_looping_redirect_is_refused_and_not_retried(server, tiny_spec, tmp_path):
    server.plan("/a.csv.gz", then=Redirect("/b.csv.gz"))
    server.plan("/b.csv.gz", then=Redirect("/a.csv.gz"))
    with pytest.raises(DownloadRefused, match="redirect") as info:
        fetch_file(server.url("a.csv.gz"), tmp_path / "x.csv.gz", tiny_spec.train.sha256, timeout_s=5)
    assert not is_retryable(info.value)
    assert len(server.hits()) <= 2 * 6


def test_a_redirect_from_https_down_to_http_is_refused():
    request = urllib.request.Request("https://host/a.csv.gz")
    with pytest.raises(DownloadRefused, match="from https to plain http"):
        _SafeRedirects().redirect_request(request, None, 302, "Found", {}, "http://host/a.csv.gz")
    assert _SafeRedirects().redirect_request(request, None, 302, "Found", {}, "https://other/a.csv.gz") is not None


@pytest.mark.parametrize("code", [400, 401, 403])
def test_permanent_http_refusals_are_not_retried(server, tiny_spec, tmp_path, code):
    server.plan(PATH, Status(code))
    with pytest.raises(DownloadRefused, match=f"HTTP {code}") as info:
        fetch_file(server.url(PATH), tmp_path / "x.csv.gz", tiny_spec.train.sha256, timeout_s=5)
    assert not is_retryable(info.value)
    assert is_retryable(DownloadError("503"))


def test_an_untrusted_tls_certificate_is_a_permanent_failure(tmp_path, tiny_mirror):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    srv = FaultServer(tiny_mirror).start()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv._server.socket = context.wrap_socket(srv._server.socket, server_side=True)
    try:
        url = srv.base_url.replace("http://", "https://") + PATH
        with pytest.raises(DownloadRefused, match="TLS certificate") as info:
            fetch_file(url, tmp_path / "x.csv.gz", None, timeout_s=5)
        assert not is_retryable(info.value)
    finally:
        srv.stop()


# ---- 2. deadline and size limits ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_server_trickling_a_byte_every_0_8_s_is_cut_off_by_the_total_deadline(server, tiny_spec, tmp_path):
    """Before: each read got a byte within the 1 s socket timeout, so the download never ended."""
    server.plan(PATH, Trickle(0.8))
    dest = raw_path(tmp_path / "raw", tiny_spec, "train")
    with pytest.raises(DownloadError, match="not complete within the deadline of 3 s") as info:
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=1.0, deadline_s=3.0)
    assert is_retryable(info.value)
    assert not dest.exists() and partial_files(tmp_path / "raw") == []


@pytest.mark.parametrize("kind", ["http", "directory"])
def test_a_file_over_the_size_limit_fails_naming_the_limit(server, tiny_mirror, tiny_spec, tmp_path, kind):
    location = server.url(PATH) if kind == "http" else str(tiny_mirror / PATH)
    with pytest.raises(DownloadRefused, match="size limit of 1000 bytes") as info:
        fetch_file(location, tmp_path / "x.csv.gz", None, timeout_s=5, max_bytes=1000)
    assert not is_retryable(info.value) and not (tmp_path / "x.csv.gz").exists()


def test_partial_files_of_a_killed_run_are_removed_and_a_live_ones_kept(server, tiny_spec, tmp_path):
    dest = raw_path(tmp_path / "raw", tiny_spec, "train")
    dest.parent.mkdir(parents=True)
    orphan = dest.with_name(f".{dest.name}.deadbeef.partial")
    orphan.write_bytes(b"half a file from a killed run")
    live = dest.with_name(f".{dest.name}.cafe.partial")
    with open(live, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a run still downloading holds its lock
        fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=5)
        assert not orphan.exists() and live.exists()
    assert dest.is_file()


# ---- issue 12 section 4: honest lineage when the cache answers -----------------------------------------


def test_a_cache_hit_names_where_and_when_the_bytes_came_from_not_the_new_source(server, tiny_spec, tmp_path,
                                                                                tiny_mirror):
    first = download_split(tiny_spec, "train", server.base_url, tmp_path / "raw", timeout_s=5)
    assert first.fetched and first.fetched_at
    other = FaultServer(tiny_mirror).start()
    try:
        again = download_split(tiny_spec, "train", other.base_url, tmp_path / "raw", timeout_s=5)
        assert other.hits() == []  # the new mirror was not contacted
    finally:
        other.stop()
    assert not again.fetched
    assert again.location == first.location == server.url(PATH)
    assert again.fetched_at == first.fetched_at
    lineage = again.lineage()
    assert lineage["served_from_cache"] is True and lineage["requested"] == other.url(PATH)
    assert lineage["location"] == server.url(PATH) and lineage["fetched_at"] == first.fetched_at


def test_a_concurrent_writer_is_never_disturbed_by_cleanup(tmp_path):
    from tasks.storage import hold_lock
    from tasks.storage import remove_stale_temporaries as remove_orphans

    folder = tmp_path / "f"
    folder.mkdir()
    path = folder / ".x.1.partial"
    ready, done = threading.Event(), threading.Event()

    def writer():
        with open(path, "wb") as fh:
            hold_lock(fh)
            ready.set()
            done.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    ready.wait(10)
    assert remove_orphans(folder, ".x.", ".partial") == [] and path.exists()
    done.set()
    thread.join()
    assert remove_orphans(folder, ".x.", ".partial") == [path] and not path.exists()


@pytest.mark.timeout(120)
def test_the_partial_file_of_a_sigkilled_download_is_removed_by_the_next_run(server, tiny_spec, tmp_path):
    import os
    import signal
    import sys
    import time

    server.plan(PATH, Trickle(0.2))  # slow enough to be killed mid-transfer
    dest = raw_path(tmp_path / "raw", tiny_spec, "train")
    code = ("import sys; from pathlib import Path; from tasks.download.fetch import fetch_file; "
            "fetch_file(sys.argv[1], Path(sys.argv[2]), None, timeout_s=5, deadline_s=600)")
    child = subprocess.Popen([sys.executable, "-c", code, server.url(PATH), str(dest)],
                             cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while not partial_files(tmp_path / "raw") and time.monotonic() < deadline:
            time.sleep(0.1)
        left = partial_files(tmp_path / "raw")
        assert left, "the child never started writing"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert partial_files(tmp_path / "raw") == left  # the killed run's litter
    server.plan(PATH)  # serve normally again
    fetch_file(server.url(PATH), dest, tiny_spec.train.sha256, timeout_s=5)
    assert partial_files(tmp_path / "raw") == [] and dest.is_file()
