"""Content-keyed caching of the data stages: warm reruns are served from cache, changed bytes never are.

The policies are applied here with ``with_options`` so the tests hold whatever decorators
download/validate currently carry; convert's decorator already uses ``CONVERT_CACHE``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect import flow, task
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from tasks import storage
from tasks.conversion.convert import convert_task
from tasks.download.fetch import RawFile, download_task
from tasks.orchestration.caching import (
    CONVERT_CACHE,
    DOWNLOAD_CACHE,
    VALIDATE_CACHE,
    ContentCache,
    download_identity,
    missing_outputs,
)
from tasks.storage import sha256_file
from tasks.validation.validate import report_in_run_dir, validate_task

download = download_task.with_options(cache_policy=DOWNLOAD_CACHE, persist_result=True, retries=0)
validate = validate_task.with_options(cache_policy=VALIDATE_CACHE, persist_result=True)
convert = convert_task.with_options(cache_policy=CONVERT_CACHE, persist_result=True)

STAGES = ("download-train", "download-test", "validate", "convert-train", "convert-test")


@flow(name="data-stages")
def data_stages(spec, source: str, data_dir: Path) -> dict:
    """download -> validate -> convert as in flows/train.py, with a fresh run folder for each run."""
    states, raws, parquet = {}, {}, {}
    for split in ("train", "test"):
        states[f"download-{split}"] = download(spec, split, source, data_dir / "raw", 30.0, return_state=True)
        raws[split] = states[f"download-{split}"].result()
    run_dir = data_dir / "runs" / spec.name / uuid.uuid4().hex[:8]
    states["validate"] = validate(spec, raws["train"].path, raws["test"].path, run_dir, return_state=True)
    report = report_in_run_dir(states["validate"].result(), run_dir)
    for split in ("train", "test"):
        states[f"convert-{split}"] = convert(raws[split], report.split(split).has_header, data_dir / "parquet", spec.name,
                                             split, return_state=True)
        parquet[split] = states[f"convert-{split}"].result()
    assert all(state.is_completed() for state in states.values())
    return {"states": {name: state.name for name, state in states.items()}, "raws": raws, "report": report,
            "parquet": parquet, "run_dir": run_dir}


@pytest.fixture
def harness(prefect_api, tmp_path):
    """A temporary Prefect API and a result store of the test's own: no test sees another's cache records."""
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-storage"}):
        yield


@pytest.fixture
def mirror(slice_mirror, tmp_path) -> Path:
    """A private copy of the slice mirror that a test may change."""
    return Path(shutil.copytree(slice_mirror, tmp_path / "mirror"))


def mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def rewrite_reversed(path: Path, has_header: bool) -> None:
    """Same name, same rows, different bytes: the data rows in reverse order."""
    with gzip.open(path, "rt", newline="") as fh:
        lines = fh.read().splitlines(keepends=True)
    head, rows = (lines[:1], lines[1:]) if has_header else ([], lines)
    with gzip.open(path, "wt", newline="") as fh:
        fh.writelines(head + rows[::-1])


def repinned(spec, mirror: Path):
    return spec.model_copy(update={split: spec.split(split).model_copy(
        update={"sha256": sha256_file(mirror / spec.split(split).path)}) for split in ("train", "test")})


def unpinned(spec):
    return spec.model_copy(update={split: spec.split(split).model_copy(update={"sha256": None})
                                   for split in ("train", "test")})


def test_warm_rerun_serves_every_data_stage_from_cache(harness, mnist_slice, mirror, tmp_path):
    data_dir = tmp_path / "data"
    cold = data_stages(mnist_slice, str(mirror), data_dir)
    assert cold["states"] == dict.fromkeys(STAGES, "Completed")
    outputs = [cold["raws"]["train"].path, cold["raws"]["test"].path, cold["report"].report_path,
               cold["parquet"]["train"], cold["parquet"]["test"]]
    before = mtimes(*outputs)

    warm = data_stages(mnist_slice, str(mirror), data_dir)

    assert warm["states"] == dict.fromkeys(STAGES, "Cached")
    assert warm["parquet"] == cold["parquet"] and warm["raws"] == cold["raws"]
    assert mtimes(*outputs) == before, "a cached stage rewrote its output"
    # The cached validation is the first run's report, copied into the new run folder naming its origin.
    assert cold["report"].report_path == cold["run_dir"] / "validation.json"
    assert warm["report"].report_path == warm["run_dir"] / "validation.json"
    copied = json.loads(warm["report"].report_path.read_text())
    assert copied["served_from_cache"] == str(cold["report"].report_path)
    assert copied["drift"] == json.loads(cold["report"].report_path.read_text())["drift"]
    # Beside each Parquet file, the hidden record of its SHA-256 at write (checked before a cache hit).
    assert sorted(p.name for p in (data_dir / "parquet" / "mnist").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (cold["parquet"]["train"], cold["parquet"]["test"]))


def test_deleted_outputs_are_computed_again(harness, mnist_slice, mirror, tmp_path):
    data_dir = tmp_path / "data"
    cold = data_stages(mnist_slice, str(mirror), data_dir)
    cold["parquet"]["train"].unlink()
    cold["report"].report_path.unlink()

    rerun = data_stages(mnist_slice, str(mirror), data_dir)

    assert rerun["states"] == {"download-train": "Cached", "download-test": "Cached", "validate": "Completed",
                               "convert-train": "Completed", "convert-test": "Cached"}
    assert rerun["parquet"]["train"] == cold["parquet"]["train"]
    assert pq.read_metadata(rerun["parquet"]["train"]).num_rows == mnist_slice.train.rows
    assert rerun["report"].report_path == rerun["run_dir"] / "validation.json"
    assert rerun["report"].report_path.is_file()
    # Served again from the new record once the outputs are back.
    assert set(data_stages(mnist_slice, str(mirror), data_dir)["states"].values()) == {"Cached"}


def test_changed_source_bytes_under_the_same_name_are_never_served_from_cache(harness, mnist_slice, mirror, tmp_path):
    data_dir = tmp_path / "data"
    cold = data_stages(mnist_slice, str(mirror), data_dir)
    rewrite_reversed(mirror / mnist_slice.train.path, has_header=False)
    changed = repinned(mnist_slice, mirror)
    assert changed.train.sha256 != mnist_slice.train.sha256 and changed.test.sha256 == mnist_slice.test.sha256

    rerun = data_stages(changed, str(mirror), data_dir)

    assert rerun["states"] == {"download-train": "Completed", "download-test": "Cached", "validate": "Completed",
                               "convert-train": "Completed", "convert-test": "Cached"}
    assert rerun["raws"]["train"].sha256 == changed.train.sha256 == storage.sha256_file(rerun["raws"]["train"].path)
    assert rerun["parquet"]["train"] != cold["parquet"]["train"]
    first_label = pq.read_table(rerun["parquet"]["train"], columns=["label"]).column(0)[0].as_py()
    with gzip.open(mirror / mnist_slice.train.path, "rt") as fh:
        assert first_label == int(fh.readline().split(",", 1)[0])


def test_unpinned_split_is_fetched_every_run_and_its_bytes_key_the_later_stages(harness, mnist_slice, mirror, tmp_path):
    data_dir, spec = tmp_path / "data", unpinned(mnist_slice)
    assert download_identity(spec=spec, split="train", raw_dir=data_dir) is None
    data_stages(spec, str(mirror), data_dir)

    same_bytes = data_stages(spec, str(mirror), data_dir)
    assert same_bytes["states"] == {"download-train": "Completed", "download-test": "Completed",
                                    "validate": "Cached", "convert-train": "Cached", "convert-test": "Cached"}

    rewrite_reversed(mirror / spec.test.path, has_header=False)
    changed = data_stages(spec, str(mirror), data_dir)
    assert changed["states"] == {"download-train": "Completed", "download-test": "Completed",
                                 "validate": "Completed", "convert-train": "Cached", "convert-test": "Completed"}
    assert changed["raws"]["test"].sha256 == sha256_file(mirror / spec.test.path)


def test_raw_file_changed_in_place_is_fetched_again(harness, mnist_slice, mirror, tmp_path):
    data_dir = tmp_path / "data"
    cold = data_stages(mnist_slice, str(mirror), data_dir)
    raw = cold["raws"]["train"].path
    rewrite_reversed(raw, has_header=False)
    assert sha256_file(raw) != mnist_slice.train.sha256

    rerun = data_stages(mnist_slice, str(mirror), data_dir)

    assert rerun["states"]["download-train"] == "Completed"
    assert sha256_file(raw) == mnist_slice.train.sha256, "the pinned bytes were not restored"
    # The restored bytes are the ones validated and converted before.
    assert {rerun["states"][s] for s in ("validate", "convert-train", "convert-test")} == {"Cached"}


def test_code_change_is_a_cache_miss(harness):
    policy = ContentCache(identity=lambda x, **_: {"x": x}, label="demo")

    @task(cache_policy=policy, persist_result=True)
    def double(x: int) -> int:
        return 2 * x

    @task(cache_policy=policy, persist_result=True)
    def double_differently(x: int) -> int:
        return x + x

    @flow
    def run() -> list[str]:
        return [t(21, return_state=True).name
                for t in (double, double, double_differently)]

    assert run() == ["Completed", "Cached", "Completed"]


def test_missing_outputs_names_gone_and_changed_files(tmp_path):
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    kept.write_bytes(b"abc")
    assert missing_outputs({"a": kept, "b": [kept]}) == []
    assert missing_outputs((kept, gone)) == [f"{gone} is missing"]
    raw = RawFile(kept, sha256_file(kept), 3, "somewhere", fetched=True)
    assert missing_outputs(raw) == []
    kept.write_bytes(b"abd")
    assert missing_outputs(raw) and "changed" in missing_outputs(raw)[0]
