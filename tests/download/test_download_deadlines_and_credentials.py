"""Credentials stay with their origin across redirects, lineage names the host that answered, and no download
waits past its deadline: not on trickled headers, and not across retries (one total deadline per file)."""

from __future__ import annotations

import base64
import time

import pytest

from tasks.download.fetch import DownloadError, DownloadRefused, download_task, fetch_file, raw_path
from tests.support.fault_server import FaultServer, Redirect, Trickle, TrickleHeaders, partial_files
from tests.support.slices import TINY_TRAIN

PATH = TINY_TRAIN
BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.fixture
def servers(tiny_mirror):
    with FaultServer(tiny_mirror) as first, FaultServer(tiny_mirror) as second:
        yield first, second


def with_credentials(url: str) -> str:
    return url.replace("http://", "http://alice:s3cret@")


def test_a_redirect_to_another_port_drops_the_credentials_and_lineage_names_the_host_that_answered(
        servers, tiny_spec, tmp_path):
    """Before: urllib copied ``Authorization: Basic`` onto the redirected request, to any host."""
    first, second = servers
    first.plan(PATH, Redirect(to=second.url(PATH)))
    raw = fetch_file(with_credentials(first.url(PATH)), tmp_path / "x.csv.gz", tiny_spec.train.sha256, timeout_s=5)
    assert [h.authorization for h in first.hits(PATH)] == [BASIC]
    assert [h.authorization for h in second.hits(PATH)] == [None]
    assert raw.location == second.url(PATH) and raw.requested == f"http://***@{first.url(PATH)[7:]}"
    assert raw.lineage()["location"] == second.url(PATH) and "s3cret" not in str(raw.lineage())


def test_credentials_are_not_sent_again_when_a_later_redirect_comes_back_to_their_origin(servers, tiny_spec, tmp_path):
    first, second = servers
    first.plan("start.csv.gz", Redirect(to=second.url("hop.csv.gz")))
    second.plan("hop.csv.gz", Redirect(to=first.url(PATH)))
    fetch_file(with_credentials(first.url("start.csv.gz")), tmp_path / "x.csv.gz", tiny_spec.train.sha256, timeout_s=5)
    assert [h.authorization for h in first.hits()] == [BASIC, None]
    assert [h.authorization for h in second.hits()] == [None]


def test_a_redirect_within_the_same_origin_keeps_the_credentials(servers, tiny_spec, tmp_path):
    first, _ = servers
    first.plan("old.csv.gz", Redirect(to="/" + PATH, code=301))
    raw = fetch_file(with_credentials(first.url("old.csv.gz")), tmp_path / "x.csv.gz", tiny_spec.train.sha256,
                     timeout_s=5)
    assert [h.authorization for h in first.hits()] == [BASIC, BASIC]
    assert raw.location == first.url(PATH)


@pytest.mark.timeout(60)
def test_headers_trickled_one_byte_at_a_time_are_cut_off_at_the_deadline(servers, tiny_spec, tmp_path):
    """Before: a server sending one header byte per second held fetch_file for 37 s against a 3 s deadline."""
    first, _ = servers
    first.plan(PATH, then=TrickleHeaders(interval=0.3))
    dest = tmp_path / "x.csv.gz"
    started = time.monotonic()
    with pytest.raises(DownloadError, match="within the deadline of 2 s"):
        fetch_file(first.url(PATH), dest, tiny_spec.train.sha256, timeout_s=1.0, deadline_s=2.0)
    assert time.monotonic() - started < 2.0 + 1.5
    assert not dest.exists() and partial_files(tmp_path) == []


@pytest.mark.timeout(120)
def test_a_trickling_mirror_fails_the_file_once_its_total_deadline_is_spent_across_retries(
        prefect_api, servers, tiny_spec, tmp_path):
    """Before: each attempt had 600 s and an overrun was retried three times (40 minutes per file)."""
    first, _ = servers
    first.plan(PATH, then=Trickle(interval=0.2))
    download = download_task.with_options(retries=10, retry_delay_seconds=0.1)
    started = time.monotonic()
    with pytest.raises(DownloadRefused) as info:
        download(tiny_spec, "train", first.url(""), tmp_path / "raw", 1.0, 2.0, 1 << 20, 5.0)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert first.url(PATH) in message and "total deadline of 5 s" in message
    assert "TRAIN_MNIST_DOWNLOAD_TOTAL_DEADLINE_S" in message
    assert elapsed < 5.0 + 2.0 + 5.0, f"took {elapsed:.1f} s"  # the limit, one attempt's grace, Prefect's overhead
    assert 2 <= len(first.hits(PATH)) <= 4  # retried while time was left, then not again
    assert not raw_path(tmp_path / "raw", tiny_spec, "train").exists() and partial_files(tmp_path) == []
