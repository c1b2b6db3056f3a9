"""A cache never serves bytes it has not checked; a stage's code version covers the project modules it
imports and the libraries that shape its output; gates are not part of validation's key."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow
import pytest
from prefect import flow
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tasks import storage
from tasks.conversion.convert import convert_task, convert_to_parquet, parquet_path
from tasks.datasets import Gates
from tasks.download.fetch import download_split, download_task
from tasks.orchestration import caching
from tasks.orchestration.caching import (
    code_version,
    dependency_sources,
    missing_outputs,
    validate_identity,
)
from tasks.training.recipes import Recipe
from tasks.validation.csvfile import CsvFileError
from tasks.validation.validate import validate_task


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def harness(prefect_api, tmp_path):
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        yield


@flow(name="convert-twice")
def convert_once(raw, parquet_dir: Path) -> tuple[str, Path]:
    state = convert_task(raw, False, parquet_dir, "mnist", "train", return_state=True)
    return state.name, state.result()


def test_a_corrupted_parquet_file_is_never_served_from_cache(harness, mnist_slice, slice_mirror, tmp_path):
    """Before: only the Parquet file's existence was checked, so altered bytes were reused forever."""
    raw = download_split(mnist_slice, "train", str(slice_mirror), tmp_path / "raw")
    name, path = convert_once(raw, tmp_path / "parquet")
    good = path.read_bytes()
    assert name == "Completed" and storage.recorded_sha256(path) == storage.sha256_file(path)
    assert convert_once(raw, tmp_path / "parquet")[0] == "Cached"
    path.write_bytes(good[:100] + bytes(b ^ 0xFF for b in good[100:164]) + good[164:])  # same size, other bytes
    assert missing_outputs(path) and "changed" in missing_outputs(path)[0]
    name, again = convert_once(raw, tmp_path / "parquet")
    assert name == "Completed" and again == path and path.read_bytes() == good


def test_an_existing_parquet_file_with_other_bytes_is_rewritten(mnist_slice, slice_mirror, tmp_path):
    csv = slice_mirror / mnist_slice.train.path
    dest = parquet_path(tmp_path, "mnist", "train", mnist_slice.train.sha256)
    convert_to_parquet(csv, dest, False, mnist_slice.train.sha256)
    good = dest.read_bytes()
    dest.write_bytes(b"swapped")
    assert convert_to_parquet(csv, dest, False, mnist_slice.train.sha256).read_bytes() == good


def test_conversion_checks_the_raw_file_against_the_checksum_its_output_is_named_after(mnist_slice, slice_mirror,
                                                                                      tmp_path):
    """Before: the output was named after the download's checksum and filled from whatever the file held now."""
    csv = tmp_path / "train.csv.gz"
    shutil.copy(slice_mirror / mnist_slice.train.path, csv)
    other = "0" * 64
    with pytest.raises(CsvFileError, match=f"expected {other}"):
        convert_to_parquet(csv, parquet_path(tmp_path, "mnist", "train", other), False, other)
    assert not parquet_path(tmp_path, "mnist", "train", other).exists()


def test_a_stage_depends_on_every_project_module_it_imports():
    deps = dependency_sources("tasks.conversion.convert")
    assert {"tasks.conversion.convert", "tasks.datasets", "tasks.validation.csvfile", "tasks.orchestration.caching", "tasks.conversion.parquet",
            "tasks.results", "tasks.storage"} <= set(deps)
    assert "tasks.datasets" in dependency_sources("tasks.validation.validate")


def test_editing_datasets_py_invalidates_every_data_stage(monkeypatch):
    """Before: only the task's own module was hashed, so an edit to tasks/datasets.py kept every stage cached."""
    contexts = [SimpleNamespace(task=t) for t in (convert_task, validate_task)]
    before = [code_version(c) for c in contexts]
    real = caching.module_source
    monkeypatch.setattr(caching, "module_source",
                        lambda name: real(name) + ("\n# edited" if name == "tasks.datasets" else ""))
    after = [code_version(c) for c in contexts]
    assert all(a != b for a, b in zip(before, after, strict=True))


def test_a_pyarrow_upgrade_invalidates_conversion_and_validation(monkeypatch):
    ctx = SimpleNamespace(task=convert_task)
    for policy in (caching.CONVERT_CACHE, caching.VALIDATE_CACHE):
        assert "pyarrow" in policy.libraries
    before = code_version(ctx, caching.CONVERT_CACHE.libraries)
    monkeypatch.setattr(pyarrow, "__version__", "999.0.0")
    assert code_version(ctx, caching.CONVERT_CACHE.libraries) != before
    assert code_version(ctx, ()) == code_version(ctx, ())  # no libraries, no change


def test_a_changed_gate_or_recipe_does_not_repeat_validation(mnist_slice, slice_mirror):
    """Issue 12: the gates were part of validation's key, so changing one re-validated unchanged data."""
    inputs = {"spec": mnist_slice, "train_path": slice_mirror / mnist_slice.train.path,
              "test_path": slice_mirror / mnist_slice.test.path}
    other_gates = mnist_slice.model_copy(update={"gates": Gates(min_accuracy=0.5, min_class_recall=0.1),
                                                 "recipe": Recipe(model="mlp", epochs=1)})
    assert validate_identity(**inputs) == validate_identity(**{**inputs, "spec": other_gates})
    other_tolerance = mnist_slice.model_copy(update={"tolerances": mnist_slice.tolerances.model_copy(
        update={"max_blank_share": 0.5})})
    assert validate_identity(**inputs) != validate_identity(**{**inputs, "spec": other_tolerance})


def test_temporary_parquet_files_of_a_killed_conversion_are_removed(mnist_slice, slice_mirror, tmp_path):
    dest = parquet_path(tmp_path, "mnist", "train", mnist_slice.train.sha256)
    dest.parent.mkdir(parents=True)
    orphan = dest.with_name(f".{dest.name}.0123abcd.tmp")
    orphan.write_bytes(b"half a Parquet file")
    convert_to_parquet(slice_mirror / mnist_slice.train.path, dest, False, mnist_slice.train.sha256)
    assert not orphan.exists() and dest.is_file()


@flow(name="download-from")
def download_from(spec, source: str, raw_dir: Path):
    return download_task(spec, "train", source, raw_dir, 10.0)


def test_a_prefect_cache_hit_logs_that_the_new_source_was_not_contacted(harness, mnist_slice, slice_mirror, tmp_path,
                                                                        caplog):
    """Issue 12: a warm cache answered for another mirror while the log and lineage named the old one."""
    first = download_from(mnist_slice, str(slice_mirror), tmp_path / "raw")
    other = "http://127.0.0.1:9/another-mirror?token=secret"
    caplog.clear()
    with caplog.at_level("INFO"):
        again = download_from(mnist_slice, other, tmp_path / "raw")
    text = caplog.text
    assert "used the verified cached copy" in text and "was not contacted" in text
    assert "http://127.0.0.1:9/another-mirror?***" in text and "secret" not in text
    assert again.location == first.location and again.lineage()["fetched_at"] == first.fetched_at
