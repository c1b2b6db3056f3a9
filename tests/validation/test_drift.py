"""Drift that keeps global statistics unchanged (mirrored images) is caught, against the reference profile
kept in the catalog and against the champion's stored profile; the distances are in every report, passed or
failed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.datasets import IMAGE_SIDE
from tasks.settings import BUNDLED_MIRROR
from tasks.validation.csvfile import read_text
from tasks.validation.profiling import read_profile
from tasks.validation.validate import DataValidationError, validate_dataset


def mirrored_copy(src: Path, dest: Path) -> Path:
    """Every image of ``src`` mirrored left-right; labels, pixel values and their global statistics unchanged."""
    data, _ = read_text(src)
    lines = data.decode().splitlines()
    header, rows = (lines[:1], lines[1:]) if not lines[0][0].isdigit() else ([], lines)
    out = []
    for line in rows:
        values = line.split(",")
        image = np.array(values[1:]).reshape(IMAGE_SIDE, IMAGE_SIDE)[:, ::-1]
        out.append(",".join([values[0], *image.ravel()]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(("\n".join(header + out) + "\n").encode(), compresslevel=1))
    return dest


@pytest.fixture(scope="module")
def mirrored_mnist_test(tmp_path_factory, catalog) -> Path:
    spec = catalog["mnist"]
    return mirrored_copy(BUNDLED_MIRROR / spec.test.path, tmp_path_factory.mktemp("mirrored") / "test.csv.gz")


def test_the_real_full_splits_pass_with_a_wide_margin_and_the_distances_are_recorded(catalog, tmp_path):
    spec = catalog["mnist"]
    report = validate_dataset(spec, BUNDLED_MIRROR / spec.train.path, BUNDLED_MIRROR / spec.test.path, tmp_path)
    geometry = report.drift["geometry"]
    assert set(geometry) == {"train_vs_reference", "test_vs_reference", "test_vs_train"}
    for name, d in geometry.items():
        assert d["mean_image_rmse"] < d["threshold"] / 3, f"{name}: {d}"
    saved = json.loads(report.report_path.read_text())
    assert {k: v["mean_image_rmse"] for k, v in saved["drift"]["geometry"].items()} == \
        pytest.approx({k: v["mean_image_rmse"] for k, v in geometry.items()})
    assert read_profile(report.profile_path)["test"].rows == 10000


def test_an_all_mirrored_test_split_fails_against_the_reference_profile(catalog, mirrored_mnist_test, tmp_path):
    """Before: label shares, pixel mean/std, blank and duplicate shares are all unchanged by mirroring."""
    spec = catalog["mnist"]
    with pytest.raises(DataValidationError) as failed:
        validate_dataset(spec, BUNDLED_MIRROR / spec.train.path, mirrored_mnist_test, tmp_path)
    message = str(failed.value)
    assert "mean image moved (test vs reference" in message
    assert "stats" not in message  # the global statistics did not notice
    geometry = json.loads((tmp_path / "validation.json").read_text())["drift"]["geometry"]
    assert geometry["test_vs_reference"]["mean_image_rmse"] > 1.5 * geometry["test_vs_reference"]["threshold"]


def test_a_custom_dataset_without_reference_is_checked_against_the_champions_profile(catalog, mirrored_mnist_test,
                                                                                     tmp_path):
    """Before: with no reference, train was compared with itself, so drift was not checked at all."""
    custom = catalog["mnist"].model_copy(update={"name": "my-digits", "reference": None})
    champion_run = validate_dataset(custom, BUNDLED_MIRROR / custom.train.path, BUNDLED_MIRROR / custom.test.path,
                                    tmp_path / "champion")
    assert champion_run.drift["geometry_champion"].startswith("no champion profile")
    champion = read_profile(champion_run.profile_path)
    mirrored_train = mirrored_copy(BUNDLED_MIRROR / custom.train.path, tmp_path / "mirrored-train.csv.gz")
    with pytest.raises(DataValidationError) as failed:
        validate_dataset(custom, mirrored_train, mirrored_mnist_test, tmp_path / "later", champion)
    message = str(failed.value)
    assert "train vs champion" in message and "test vs champion" in message
    same = validate_dataset(custom, BUNDLED_MIRROR / custom.train.path, BUNDLED_MIRROR / custom.test.path,
                            tmp_path / "same", champion)
    assert same.drift["geometry"]["train_vs_champion"]["mean_image_rmse"] == pytest.approx(0, abs=1e-3)
