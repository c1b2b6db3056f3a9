"""The download functions on a well-behaved source: directory, file:// URL and plain HTTP mirrors, the
raw-cache layout, cache hits that fetch nothing, and checksum pins that name expected and found values.

Faults (5xx, resets, cut bodies, stalls, redirects) and Prefect's retries are in test_download_faults.py.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from tasks.datasets import COLUMNS, DatasetSpec
from tasks.download.fetch import (
    ChecksumMismatch,
    DownloadError,
    SourceNotFound,
    download_split,
    fetch_file,
    is_retryable,
    raw_path,
    resolve_location,
)
from tasks.download.locations import LocationError
from tasks.storage import sha256_file
from tests.support.fault_server import FaultServer, partial_files
from tests.support.slices import build_slice_mirror, slice_spec

SPLITS = ("train", "test")
TINY_ROWS = {"train": 30, "test": 20}  # a few KB per file: these tests are about bytes, not data


def first_line_and_rows(path: Path) -> tuple[str, int]:
    with gzip.open(path, "rt") as fh:
        first = fh.readline()
        return first, 1 + sum(1 for _ in fh)


def unpinned(spec: DatasetSpec, split: str) -> DatasetSpec:
    return spec.model_copy(update={split: spec.split(split).model_copy(update={"sha256": None})})


def repinned(spec: DatasetSpec, split: str, sha256: str) -> DatasetSpec:
    return spec.model_copy(update={split: spec.split(split).model_copy(update={"sha256": sha256})})


@pytest.fixture(scope="module")
def tiny_mirror(tmp_path_factory, catalog) -> Path:
    """The built-in datasets' mirror layout holding the first few rows of each real file."""
    return build_slice_mirror(tmp_path_factory.mktemp("tiny-mirror"), catalog.values(), TINY_ROWS)


def tiny_spec(spec: DatasetSpec, mirror: Path) -> DatasetSpec:
    return slice_spec(spec, mirror, TINY_ROWS)


@pytest.fixture(scope="module")
def mnist_tiny(catalog, tiny_mirror) -> DatasetSpec:
    return tiny_spec(catalog["mnist"], tiny_mirror)


@pytest.fixture(scope="module")
def fashion_tiny(catalog, tiny_mirror) -> DatasetSpec:
    return tiny_spec(catalog["fashion-mnist"], tiny_mirror)


@pytest.fixture
def mirror_copy(tiny_mirror, tmp_path) -> Path:
    """A private copy of the tiny mirror that a test may change."""
    return Path(shutil.copytree(tiny_mirror, tmp_path / "mirror"))


# ---- where a split's file comes from and goes to -------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "relative", "expected"),
    [
        ("/srv/mirror", "mnist/a.csv.gz", "/srv/mirror/mnist/a.csv.gz"),
        ("/srv/mirror/", "mnist/a.csv.gz", "/srv/mirror/mnist/a.csv.gz"),
        ("http://host:8000/data", "mnist/a.csv.gz", "http://host:8000/data/mnist/a.csv.gz"),
        ("http://host:8000/data/", "mnist/a.csv.gz", "http://host:8000/data/mnist/a.csv.gz"),
        ("https://host/data", "mnist/a.csv.gz", "https://host/data/mnist/a.csv.gz"),
        ("file:///srv/mirror", "mnist/a.csv.gz", "file:///srv/mirror/mnist/a.csv.gz"),
        ("http://host/data", "https://elsewhere/x.csv.gz", "https://elsewhere/x.csv.gz"),
    ],
)
def test_resolve_location_joins_relative_paths_and_keeps_full_http_urls(source, relative, expected):
    assert resolve_location(source, relative) == expected


def test_raw_files_land_under_dataset_and_split(mnist_tiny, tmp_path):
    assert raw_path(tmp_path, mnist_tiny, "train") == tmp_path / "mnist" / "train" / "mnist_train.csv.gz"
    url_spec = mnist_tiny.model_copy(update={"test": mnist_tiny.test.model_copy(
        update={"path": "https://host/files/t10k.csv.gz?sig=abc"})})
    assert raw_path(tmp_path, url_spec, "test") == tmp_path / "mnist" / "test" / "t10k.csv.gz"


# ---- the three kinds of source; both CSV layouts -----------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_both_csv_layouts_are_fetched_byte_exact_from_a_directory(name, mnist_tiny, fashion_tiny, tiny_mirror,
                                                                  tmp_path):
    spec = {"mnist": mnist_tiny, "fashion-mnist": fashion_tiny}[name]
    for split in SPLITS:
        raw = download_split(spec, split, str(tiny_mirror), tmp_path / "raw")
        assert raw.fetched and raw.path == raw_path(tmp_path / "raw", spec, split)
        assert raw.sha256 == spec.split(split).sha256 == sha256_file(raw.path)
        assert raw.size == raw.path.stat().st_size
        assert raw.location == str(tiny_mirror / spec.split(split).path)
        first, lines = first_line_and_rows(raw.path)
        if spec.header:  # fashion-mnist: a header line, then the rows
            assert first.rstrip("\r\n").split(",") == list(COLUMNS)
            assert lines == spec.split(split).rows + 1
        else:  # mnist: rows from the first line on
            assert first.split(",")[0].isdigit() and len(first.split(",")) == len(COLUMNS)
            assert lines == spec.split(split).rows
    assert partial_files(tmp_path / "raw") == []


def test_a_plain_http_mirror_serves_both_layouts(http_mirror, tiny_mirror, mnist_tiny, fashion_tiny, tmp_path):
    source = http_mirror(tiny_mirror)
    for spec in (mnist_tiny, fashion_tiny):
        for split in SPLITS:
            raw = download_split(spec, split, source, tmp_path / "raw", timeout_s=10)
            assert raw.location == source + spec.split(split).path
            assert raw.sha256 == spec.split(split).sha256
            assert raw.path.read_bytes() == (tiny_mirror / spec.split(split).path).read_bytes()
    assert partial_files(tmp_path / "raw") == []


def test_a_file_url_mirror(tiny_mirror, fashion_tiny, tmp_path):
    source = tiny_mirror.as_uri()
    raw = download_split(fashion_tiny, "test", source, tmp_path / "raw")
    assert raw.location == f"{source}/{fashion_tiny.test.path}"
    assert raw.fetched and raw.sha256 == fashion_tiny.test.sha256


def test_an_absolute_split_path_is_refused_before_anything_is_read(tiny_mirror, mnist_tiny, tmp_path):
    absolute = str(tiny_mirror / mnist_tiny.test.path)
    spec = mnist_tiny.model_copy(update={"test": mnist_tiny.test.model_copy(update={"path": absolute})})
    with pytest.raises(LocationError, match=f"dataset mnist: path '{absolute}' is absolute"):
        download_split(spec, "test", "http://127.0.0.1:9/nowhere", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# ---- the raw cache -----------------------------------------------------------------------------------


def test_a_verified_cached_file_is_not_fetched_again_over_http(tiny_mirror, mnist_tiny, tmp_path):
    with FaultServer(tiny_mirror) as server:
        first = download_split(mnist_tiny, "train", server.base_url, tmp_path / "raw", timeout_s=10)
        stamp = first.path.stat().st_mtime_ns
        again = download_split(mnist_tiny, "train", server.base_url, tmp_path / "raw", timeout_s=10)
        assert len(server.hits(mnist_tiny.train.path)) == 1
    assert first.fetched and not again.fetched
    assert (again.path, again.sha256, again.size) == (first.path, first.sha256, first.size)
    assert again.path.stat().st_mtime_ns == stamp


def test_a_verified_cached_file_survives_the_source_disappearing(mirror_copy, mnist_tiny, tmp_path):
    download_split(mnist_tiny, "test", str(mirror_copy), tmp_path / "raw")
    shutil.rmtree(mirror_copy)
    again = download_split(mnist_tiny, "test", str(mirror_copy), tmp_path / "raw")
    assert not again.fetched and again.sha256 == mnist_tiny.test.sha256


def test_a_cached_file_that_no_longer_matches_its_pin_is_fetched_again(tiny_mirror, mnist_tiny, tmp_path):
    raw = download_split(mnist_tiny, "test", str(tiny_mirror), tmp_path / "raw")
    raw.path.write_bytes(b"bit rot")
    again = download_split(mnist_tiny, "test", str(tiny_mirror), tmp_path / "raw")
    assert again.fetched and sha256_file(again.path) == mnist_tiny.test.sha256


def test_an_unpinned_split_is_fetched_every_time_and_its_checksum_recorded(mirror_copy, mnist_tiny, tmp_path):
    spec = unpinned(mnist_tiny, "test")
    first = download_split(spec, "test", str(mirror_copy), tmp_path / "raw")
    assert first.fetched and first.sha256 == mnist_tiny.test.sha256
    (mirror_copy / spec.test.path).write_bytes(b"new upstream bytes")
    second = download_split(spec, "test", str(mirror_copy), tmp_path / "raw")
    assert second.fetched and second.path.read_bytes() == b"new upstream bytes"
    assert second.sha256 == sha256_file(second.path) != first.sha256


# ---- failures name the problem -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "http"])
def test_checksum_mismatch_names_location_expected_and_found(kind, tiny_mirror, http_mirror, mnist_tiny, tmp_path):
    wrong_pin = mnist_tiny.test.sha256  # the test file's pin on the train split
    spec = repinned(mnist_tiny, "train", wrong_pin)
    source = str(tiny_mirror) if kind == "directory" else http_mirror(tiny_mirror)
    with pytest.raises(ChecksumMismatch) as info:
        download_split(spec, "train", source, tmp_path / "raw", timeout_s=10)
    message = str(info.value)
    found = sha256_file(tiny_mirror / spec.train.path)
    assert resolve_location(source, spec.train.path) in message
    assert f"expected {wrong_pin}, found {found}" in message
    assert f"({(tiny_mirror / spec.train.path).stat().st_size} bytes)" in message
    assert not is_retryable(info.value)
    assert not raw_path(tmp_path / "raw", spec, "train").exists()
    assert partial_files(tmp_path / "raw") == []


def test_a_mismatch_never_replaces_the_file_already_in_the_cache(tiny_mirror, mnist_tiny, tmp_path):
    dest = raw_path(tmp_path / "raw", mnist_tiny, "train")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"what an earlier pin accepted")
    with pytest.raises(ChecksumMismatch):
        fetch_file(str(tiny_mirror / mnist_tiny.train.path), dest, "0" * 64)
    assert dest.read_bytes() == b"what an earlier pin accepted"
    assert partial_files(tmp_path / "raw") == []


@pytest.mark.parametrize("kind", ["directory", "file-url", "http"])
def test_a_missing_file_is_not_found_and_not_retryable(kind, tiny_mirror, http_mirror, mnist_tiny, tmp_path):
    spec = mnist_tiny.model_copy(update={"train": mnist_tiny.train.model_copy(update={"path": "mnist/nope.csv.gz"})})
    source = {"directory": str(tiny_mirror), "file-url": tiny_mirror.as_uri(),
              "http": http_mirror(tiny_mirror) if kind == "http" else ""}[kind]
    with pytest.raises(SourceNotFound) as info:
        download_split(spec, "train", source, tmp_path / "raw", timeout_s=10)
    assert "mnist/nope.csv.gz" in str(info.value)
    assert ("HTTP 404" in str(info.value)) == (kind == "http")
    assert not is_retryable(info.value)
    assert not raw_path(tmp_path / "raw", spec, "train").exists()
    assert partial_files(tmp_path / "raw") == []


def test_only_network_trouble_is_retryable():
    assert is_retryable(DownloadError("x: HTTP 503"))
    assert not is_retryable(ChecksumMismatch("x"))
    assert not is_retryable(SourceNotFound("x"))
    assert not is_retryable(ValueError("x"))
    assert not is_retryable(None)
