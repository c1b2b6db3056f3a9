"""Validation of the real slices: both CSV layouts pass, the drift numbers are right, reports are written."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tasks.datasets import COLUMNS
from tasks.validation.csvfile import read_text, sniff_columns
from tasks.validation.profiling import pixel_mean_std
from tasks.validation.validate import DataValidationError, read_matrix, validate_dataset


def load_slice(path: Path) -> tuple[np.ndarray, bool]:
    """The slice parsed independently of tasks.validation.validate (stdlib csv + NumPy): (matrix, has_header)."""
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    has_header = lines[0].startswith("label")
    rows = lines[1:] if has_header else lines
    return np.array([[int(v) for v in row.split(",")] for row in rows], dtype=np.int64), has_header


def paths(spec, mirror: Path) -> tuple[Path, Path]:
    return mirror / spec.train.path, mirror / spec.test.path


@pytest.mark.parametrize(("fixture", "header"), [("mnist_slice", False), ("fashion_slice", True)])
def test_real_slices_pass_in_both_layouts(request, slice_mirror, tmp_path, fixture, header):
    spec = request.getfixturevalue(fixture)
    report = validate_dataset(spec, *paths(spec, slice_mirror), tmp_path)
    assert report.passed and report.failures == []
    assert (report.train.has_header, report.test.has_header) == (header, header)
    assert report.train.rows == spec.train.rows or report.train.rows > 0
    saved = json.loads(report.report_path.read_text())
    assert saved["passed"] is True and saved["dataset"] == spec.name
    suites = [r["suite_name"] for r in saved["great_expectations"]]
    assert suites == [f"{spec.name}-{s}" for s in ("train-schema", "train-rows", "test-schema", "test-rows",
                                                    "train-stats", "test-stats", "pair", "geometry")]
    assert all(r["success"] for r in saved["great_expectations"])


@pytest.mark.parametrize("fixture", ["mnist_slice", "fashion_slice"])
def test_drift_numbers_match_an_independent_computation(request, slice_mirror, tmp_path, fixture):
    spec = request.getfixturevalue(fixture)
    train_path, test_path = paths(spec, slice_mirror)
    report = validate_dataset(spec, train_path, test_path, tmp_path)
    split_arrays = {"train": load_slice(train_path)[0], "test": load_slice(test_path)[0]}
    proportions = np.array(spec.reference.class_counts) / sum(spec.reference.class_counts)
    for split, array in split_arrays.items():
        drift = report.drift[split]
        labels, pixels = array[:, 0], array[:, 1:]
        counts = np.bincount(labels, minlength=10)
        assert drift["rows"] == len(array)
        assert drift["label_counts"] == counts.tolist()
        assert drift["pixel_mean"] == pytest.approx(pixels.mean(), rel=1e-12)
        assert drift["pixel_std"] == pytest.approx(pixels.std(), rel=1e-12)
        observed = counts / counts.sum()
        kl = sum(p * math.log(p / q) for p, q in zip(observed, proportions, strict=True) if p)
        assert drift["label_kl"] == pytest.approx(kl, rel=1e-9)
        assert drift["min_class_share_ratio"] == pytest.approx((observed / proportions).min(), rel=1e-9)
        assert drift["blank_share"] == (pixels.max(axis=1) == 0).mean()
        assert drift["duplicate_share"] == 1 - len({r.tobytes() for r in pixels}) / len(pixels)
    train_images = {r.tobytes() for r in split_arrays["train"][:, 1:]}
    shared = sum(r.tobytes() in train_images for r in split_arrays["test"][:, 1:])
    assert report.drift["pair"] == {"test_in_train_share": shared / 600, "test_to_train_rows": 600 / 3000}
    # The real slices: every class present, no blank images, within the tolerances of the published reference.
    assert all(report.drift[s]["label_kl"] < spec.tolerances.max_label_kl for s in ("train", "test"))
    assert abs(report.drift["train"]["pixel_mean"] / spec.reference.pixel_mean - 1) < spec.tolerances.pixel_mean_rel_tol
    assert json.loads(report.report_path.read_text())["drift"]["train"] == report.drift["train"]


def test_a_dataset_without_reference_computes_it_from_train_and_records_it(mnist_slice, slice_mirror, tmp_path):
    spec = mnist_slice.model_copy(update={"reference": None})
    report = validate_dataset(spec, *paths(spec, slice_mirror), tmp_path)
    computed = report.drift["reference_computed_from_train"]
    assert computed["class_counts"] == [float(c) for c in report.drift["train"]["label_counts"]]
    assert computed["pixel_mean"] == report.drift["train"]["pixel_mean"]
    assert computed["pixel_std"] == report.drift["train"]["pixel_std"]
    assert report.drift["train"]["label_kl"] == 0.0 and report.drift["train"]["min_class_share_ratio"] == 1.0
    assert 0 < report.drift["test"]["label_kl"] < spec.tolerances.max_label_kl
    assert json.loads(report.report_path.read_text())["drift"]["reference_computed_from_train"] == computed


def test_data_docs_are_built_into_the_report_folder_and_list_the_suites(fashion_slice, slice_mirror, tmp_path):
    report = validate_dataset(fashion_slice, *paths(fashion_slice, slice_mirror), tmp_path)
    assert report.docs_path == tmp_path / "data_docs" / "index.html"
    index = report.docs_path.read_text()
    for suite in ("train-schema", "train-rows", "test-rows", "train-stats", "test-stats", "pair"):
        assert f"fashion-mnist-{suite}" in index
    pages = list((tmp_path / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 8
    assert json.loads(report.report_path.read_text())["data_docs"] == str(report.docs_path)
    # A second run in the same folder replaces the docs whole; no staging folders are left behind.
    validate_dataset(fashion_slice, *paths(fashion_slice, slice_mirror), tmp_path)
    assert len(list((tmp_path / "data_docs" / "validations").rglob("*.html"))) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_docs", "data_profile.json", "validation.html",
                                                          "validation.json"]


def test_a_failed_run_also_writes_report_and_docs(mnist_slice, slice_mirror, tmp_path):
    train, test = paths(mnist_slice, slice_mirror)
    with pytest.raises(DataValidationError) as failed:
        validate_dataset(mnist_slice, test, train, tmp_path)  # swapped
    assert failed.value.report_path == tmp_path / "validation.json"
    saved = json.loads(failed.value.report_path.read_text())
    assert saved["passed"] is False and saved["failures"]
    assert saved["drift"]["pair"]["test_to_train_rows"] == 5.0
    index = (tmp_path / "data_docs" / "index.html").read_text()
    assert "mnist-train-rows" in index and "mnist-pair" in index


def test_gx_stays_quiet(mnist_slice, slice_mirror, tmp_path, capfd, caplog):
    validate_dataset(mnist_slice, *paths(mnist_slice, slice_mirror), tmp_path)
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err  # no progress bars
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]


def test_read_matrix_parses_the_real_slice_exactly_in_both_layouts(slice_mirror, catalog):
    for spec in catalog.values():
        path = slice_mirror / spec.train.path
        data, problem = read_text(path)
        columns, has_header = sniff_columns(data, path.name, spec.header)
        assert problem is None and columns == list(COLUMNS) and has_header == bool(spec.header)
        parsed = read_matrix(data, path.name, columns, has_header)
        expected, _ = load_slice(path)
        assert parsed.matrix.dtype == np.uint8 and np.array_equal(parsed.matrix, expected)
        assert parsed.line_of(0) == 1 + has_header and parsed.bad_rows == []


def test_read_text_accepts_plain_csv_and_concatenated_gzip_members(tmp_path):
    text = b"1,2\n3,4\n"
    (tmp_path / "plain.csv").write_bytes(text)
    (tmp_path / "multi.csv.gz").write_bytes(gzip.compress(text[:4]) + gzip.compress(text[4:]))
    assert read_text(tmp_path / "plain.csv") == (text, None)
    assert read_text(tmp_path / "multi.csv.gz") == (text, None)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_pixel_mean_std_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20_000, 784)).astype(dtype)
    if dtype == np.float32:
        pixels /= 255
    mean, std = pixel_mean_std(pixels)
    assert mean == pytest.approx(pixels.mean(dtype=np.float64), rel=1e-12)
    assert std == pytest.approx(pixels.std(dtype=np.float64), rel=1e-9)


@pytest.mark.parametrize("fixture", ["mnist_slice", "fashion_slice"])
def test_layout_is_detected_when_the_spec_does_not_say(request, slice_mirror, tmp_path, fixture):
    spec = request.getfixturevalue(fixture)
    report = validate_dataset(spec.model_copy(update={"header": None}), *paths(spec, slice_mirror), tmp_path)
    assert (report.train.has_header, report.test.has_header) == (bool(spec.header), bool(spec.header))


def test_line_numbers_stay_right_after_skipped_malformed_rows(fashion_slice, slice_mirror, tmp_path):
    from tests.support import badinputs

    header, rows = badinputs.read_slice(slice_mirror / fashion_slice.train.path)
    rows[5] = rows[5].rsplit(",", 10)[0]  # 775 fields: skipped
    cells = rows[40].split(",")
    cells[7] = "999"
    rows[40] = ",".join(cells)
    bad = badinputs.write_csv_gz(tmp_path / "train.csv.gz", header, rows)
    with pytest.raises(DataValidationError) as failed:
        validate_dataset(fashion_slice, bad, slice_mirror / fashion_slice.test.path, tmp_path / "report")
    message = str(failed.value)
    # Data row 5 is line 7 (after the header); data row 40 is line 42 even though a row before it was skipped.
    assert "1 row(s) with the wrong number of fields, expected 785" in message and "line 7 has 775 fields" in message
    assert "pixel value above 255: expected <= 255; found 1 of 2999 rows, e.g. line 42 pixel7=999" in message
