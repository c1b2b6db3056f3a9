"""What goes wrong in the wild: each kind of bad file, fed as a dataset's train or test file, fails
validation with a message that names the problem, and the report (drift numbers where they can be
computed) and the Data Docs are still written.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.datasets import DatasetSpec
from tasks.registry.folder import POINTER, list_versions, read_production
from tasks.registry.run_log import RUN_LOG_FILE, TREND_FILE, read_run_log
from tasks.validation.validate import DataValidationError, validate_dataset
from tests.support import badinputs as bad

READABLE = ("train", "test", "pair")  # drift sections present when both splits could be read
TRAIN_UNREADABLE = ("test",)  # only the good split has drift numbers
Maker = Callable[[dict[str, Path], Path], dict[str, Path]]


def on(split: str, maker: Callable[[Path, Path], Path]) -> Maker:
    """Replace ``split``'s file by ``maker`` applied to that split's real slice."""
    def make(slices: dict[str, Path], out: Path) -> dict[str, Path]:
        return {**slices, split: maker(slices[split], out / split / slices[split].name)}
    return make


def swapped(slices: dict[str, Path], out: Path) -> dict[str, Path]:
    return {"train": slices["test"], "test": slices["train"]}


def train_head_as_test(slices: dict[str, Path], out: Path) -> dict[str, Path]:
    header = bad.read_slice(slices["test"])[0] is not None
    return {**slices, "test": bad.overlapping_test_split(slices["train"], out / "test" / slices["test"].name, 600,
                                                         header)}


@dataclass(frozen=True)
class Case:
    kind: str
    dataset: str  # mnist (no header) or fashion-mnist (header)
    make: Maker
    phrases: tuple[str, ...]  # regular expressions the error message must match
    drift: tuple[str, ...] = READABLE
    rows_pinned: bool = True  # False: the spec pins no row counts
    reference: bool = True  # False: the spec has no reference (computed from train)

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.dataset}" + ("-unpinned-rows" if not self.rows_pinned else "") + (
            "-no-reference" if not self.reference else "")


E = re.escape
CASES = [
    # values
    Case("pixel-above-255", "mnist", on("train", bad.pixel_above_255),
         (E("mnist-train-rows: pixel value above 255: expected <= 255; found 1 of 3000 rows, e.g. line 18 pixel300=300"),)),
    Case("pixel-below-0", "fashion-mnist", on("train", bad.pixel_below_0),
         (E("fashion-mnist-train-rows: pixel value below 0: expected >= 0; found 1 of 3000 rows, "
            "e.g. line 19 pixel300=-4"),)),
    Case("pixel-float", "mnist", on("test", bad.pixel_float),
         (E("mnist-test-rows: non-integer pixel values: expected <= 0; found 1 of 600 rows, "
            "e.g. line 18 pixel300=12.5"),)),
    Case("pixel-non-numeric", "fashion-mnist", on("train", bad.pixel_non_numeric),
         (E("non-numeric value 'abc' in column pixel300 at line 19; expected integers"),), TRAIN_UNREADABLE),
    Case("empty-cell", "fashion-mnist", on("test", bad.empty_cell),
         (E("fashion-mnist-test-rows: empty pixel cells: expected <= 0; found 1 of 600 rows, "
            "e.g. line 19 pixel300=empty"),)),
    # header layout
    Case("missing-pixel-column", "fashion-mnist", on("train", bad.missing_pixel_column),
         (E("fashion-mnist-train-schema: column layout differs from label, pixel1..pixel784: expected 785 columns "
            "label, pixel1, ..., pixel784; found missing columns [pixel300]"),), TRAIN_UNREADABLE),
    Case("missing-pixel-column", "mnist", on("train", bad.missing_pixel_column),
         (E("mnist-train-schema: column layout differs") + ".*" + E("found rows have 784 fields, expected 785"),),
         TRAIN_UNREADABLE),
    Case("extra-column", "fashion-mnist", on("test", bad.extra_column),
         (E("fashion-mnist-test-schema: column layout differs") + ".*" + E("found unexpected columns [source]"),),
         ("train",)),
    Case("extra-column", "mnist", on("train", bad.extra_column),
         (E("found rows have 786 fields, expected 785"),), TRAIN_UNREADABLE),
    Case("columns-wrong-order", "fashion-mnist", on("train", bad.columns_swapped_in_header),
         (E("found columns in the wrong order: position 300 has pixel301, expected pixel300, "
            "position 301 has pixel300, expected pixel301"),), TRAIN_UNREADABLE),
    # labels
    Case("label-outside-classes", "mnist", on("train", bad.label_outside_classes),
         (E("mnist-train-rows: label outside the classes 0..9: expected a value in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]; "
            "found 1 of 3000 rows, e.g. line 18 label=12"),)),
    Case("label-missing", "fashion-mnist", on("train", bad.label_missing),
         (E("fashion-mnist-train-rows: label missing: expected not null; found 1 of 3000 rows, e.g. line 19 label=empty"),)),
    # broken files
    Case("empty-file", "mnist", on("train", bad.empty_file),
         (E("mnist-train (mnist_train.csv.gz): file is empty (no header, no rows)"),), TRAIN_UNREADABLE),
    Case("header-only", "fashion-mnist", on("train", bad.header_only),
         (E("fashion-mnist-train-rows: row count differs from the pinned count: expected == 3000; found 0"),
          E("no data rows after the header (header-only file)")), TRAIN_UNREADABLE),
    Case("header-only", "fashion-mnist", on("test", bad.header_only),
         (E("fashion-mnist-test (fashion-mnist_test.csv.gz): no data rows after the header (header-only file)"),),
         ("train",), rows_pinned=False),
    Case("header-only", "mnist", on("train", lambda src, dest: bad.header_only(
        src.parent.parent / "fashion-mnist" / "fashion-mnist_train.csv.gz", dest)),
         (E("mnist-train (mnist_train.csv.gz): expected no header row; first line: 'label,pixel1,pixel2,"),),
         TRAIN_UNREADABLE),
    Case("truncated-mid-row", "mnist", on("train", bad.truncated_mid_row),
         (E("mnist-train (mnist_train.csv.gz): 1 row(s) with the wrong number of fields, expected 785 "
            "(truncated or malformed rows, skipped): line 3000 has ") + r"\d+ fields",
          E("row count differs from the pinned count: expected == 3000; found 2999"))),
    Case("truncated-mid-row", "fashion-mnist", on("test", bad.truncated_mid_row),
         (E("1 row(s) with the wrong number of fields, expected 785") + ".*" + E("line 601 has"),),
         rows_pinned=False),
    Case("truncated-gzip", "fashion-mnist", on("train", bad.truncated_gzip),
         (E("fashion-mnist-train: fashion-mnist_train.csv.gz: gzip stream truncated (no end-of-stream marker after"),
          E("row count differs from the pinned count: expected == 3000; found")),),
    Case("truncated-gzip", "mnist", on("test", bad.truncated_gzip),
         (E("mnist-test: mnist_test.csv.gz: gzip stream truncated"),), rows_pinned=False),
    Case("html-error-page", "mnist", on("train", bad.html_error_page),
         (E("mnist-train (mnist_train.csv.gz): looks like an HTML page, not CSV; starts with '<!DOCTYPE html>"),),
         TRAIN_UNREADABLE),
    Case("json-document", "fashion-mnist", on("test", bad.json_document),
         (E("fashion-mnist-test (fashion-mnist_test.csv.gz): looks like a JSON document, not CSV; "
            "starts with '{\"error\": \"rate limited\""),), ("train",)),
    # distributions
    Case("one-class-missing", "mnist", on("train", bad.one_class_missing),
         (E("mnist-train-stats: a class is under-represented (smallest observed/reference share): "
            "expected >= 0.5; found 0 "),
          E("mnist-train-stats: class balance drifted (label KL divergence from the reference): expected <= 0.05"))),
    Case("ninety-percent-one-class", "fashion-mnist", on("train", bad.ninety_percent_one_class),
         (E("fashion-mnist-train-stats: class balance drifted (label KL divergence from the reference): "
            "expected <= 0.05; found 1.") + r"\d+",)),
    Case("ninety-percent-one-class", "mnist", on("train", bad.ninety_percent_one_class),
         # No reference: the train split is its own reference, and the test split is compared with it.
         (E("mnist-test-stats: class balance drifted (label KL divergence from the reference): expected <= 0.05"),),
         reference=False),
    Case("inverted-images", "mnist", on("train", bad.inverted_images),
         (E("mnist-train-stats: pixel mean drifted from the reference: expected between 29.99 and 36.65; found 221.6"),)),
    Case("inverted-images", "fashion-mnist", on("train", bad.inverted_images),
         (E("fashion-mnist-test-stats: pixel mean drifted from the reference: expected between"),), reference=False),
    Case("scaled-to-unit-floats", "fashion-mnist", on("test", bad.scaled_to_unit_floats),
         (E("fashion-mnist-test-stats: pixel mean drifted from the reference: expected between 65.64 and 80.22; "
            "found 0.2"),
          E("fashion-mnist-test-rows: non-integer pixel values: expected <= 0; found "))),
    Case("blank-images", "mnist", on("test", bad.blank_images),
         (E("mnist-test-stats: too many blank (all-zero) images: expected <= 0.01; found 0.2 "),)),
    Case("duplicate-rows", "fashion-mnist", on("train", bad.duplicate_rows),
         (E("fashion-mnist-train-stats: too many exact duplicate images: expected <= 0.01; found 0.1997 "),)),
    # the two splits
    Case("train-test-swapped", "mnist", swapped,
         (E("mnist-train-rows: row count differs from the pinned count: expected == 3000; found 600"),
          E("mnist-test-rows: row count differs from the pinned count: expected == 600; found 3000"))),
    Case("train-test-swapped", "fashion-mnist", swapped,
         (E("fashion-mnist-pair: test split has more rows than train (splits swapped?): expected <= 1; found 5 "),),
         rows_pinned=False),
    Case("test-overlaps-train", "mnist", train_head_as_test,
         (E("mnist-pair: test split overlaps the train split (test images found in train): expected <= 0.01; found 1 "),)),
    Case("test-overlaps-train", "fashion-mnist", train_head_as_test,
         (E("fashion-mnist-pair: test split overlaps the train split"),), rows_pinned=False, reference=False),
]
KINDS = sorted({case.kind for case in CASES})


def spec_for(case: Case, specs: dict[str, DatasetSpec]) -> DatasetSpec:
    spec = specs[case.dataset]
    changes: dict = {}
    if not case.rows_pinned:
        changes |= {s: spec.split(s).model_copy(update={"rows": None}) for s in ("train", "test")}
    if not case.reference:
        changes["reference"] = None
    return spec.model_copy(update=changes)


@pytest.fixture
def specs(mnist_slice, fashion_slice) -> dict[str, DatasetSpec]:
    return {"mnist": mnist_slice, "fashion-mnist": fashion_slice}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_naming_the_problem_and_still_writes_the_report(case, specs, slice_mirror, tmp_path):
    spec = spec_for(case, specs)
    slices = {s: slice_mirror / spec.split(s).path for s in ("train", "test")}
    files = case.make(slices, tmp_path / "in")
    report_dir = tmp_path / "report"
    with pytest.raises(DataValidationError) as failed:
        validate_dataset(spec, files["train"], files["test"], report_dir)
    message = str(failed.value)
    for phrase in case.phrases:
        assert re.search(phrase, message), f"{phrase!r} not in:\n{message}"
    saved = json.loads((report_dir / "validation.json").read_text())
    assert saved["passed"] is False and saved["failures"] and all(f in message for f in saved["failures"])
    assert set(case.drift) <= set(saved["drift"])
    for split in ("train", "test"):
        if split in case.drift:
            assert saved["drift"][split]["rows"] > 0 and "pixel_mean" in saved["drift"][split]
    if not case.reference and "train" in case.drift:
        assert "reference_computed_from_train" in saved["drift"]
    assert (report_dir / "data_docs" / "index.html").is_file()
    assert f"{spec.name}-" in (report_dir / "data_docs" / "index.html").read_text()


def test_every_kind_of_bad_input_is_covered():
    assert len(KINDS) == 24, KINDS


# ---- the flow refuses bad data and leaves production alone ---------------------------------------

FLOW_CASES = {  # dataset name in the TOML file -> (bad file maker on the train split, phrase)
    "bad-html": (bad.html_error_page, "looks like an HTML page, not CSV"),
    "bad-pixels": (bad.pixel_above_255, "pixel value above 255: expected <= 255; found 1 of 3000 rows, e.g. line 18 "
                                        "pixel300=300"),
    "bad-inverted": (bad.inverted_images, "pixel mean drifted from the reference"),
}
OLD_VERSION = "20200101T000000Z-000000"


@pytest.fixture(scope="module")
def bad_flow_run(prefect_api, slice_mirror, catalog, tmp_path_factory):
    """One train-mnist run over three datasets with bad train files, with a production version in place."""
    root = tmp_path_factory.mktemp("bad-flow")
    mirror = root / "mirror"
    shutil.copytree(slice_mirror, mirror)
    entries = []
    for name, (maker, _) in FLOW_CASES.items():
        maker(mirror / catalog["mnist"].train.path, mirror / name / "train.csv.gz")
        entries.append(f"""
[[dataset]]
name = "{name}"
header = false
class_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
train = {{ path = "{name}/train.csv.gz", rows = 3000 }}
test = {{ path = "{catalog['mnist'].test.path}", rows = 600 }}
gates = {{ min_accuracy = 0.5 }}
reference = {{ class_counts = {list(catalog['mnist'].reference.class_counts)}, pixel_mean = 33.318, pixel_std = 78.567 }}
""")
    datasets_file = root / "bad-datasets.toml"
    datasets_file.write_text("".join(entries))
    registry, data_dir = root / "registry", root / "data"
    for name in FLOW_CASES:  # an earlier good version is in production
        (registry / name / OLD_VERSION).mkdir(parents=True)
        (registry / name / OLD_VERSION / "model.keras").write_bytes(b"old model")
        (registry / name / POINTER).write_text(OLD_VERSION + "\n")
    from flows.train import train_mnist

    state = train_mnist(dataset=",".join(FLOW_CASES), datasets_file=str(datasets_file), source=str(mirror),
                        registry=str(registry), data_dir=str(data_dir), epochs=1, return_state=True)
    return state, registry, data_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FLOW_CASES))
def test_flow_fails_on_bad_data_and_leaves_production_alone(bad_flow_run, name):
    state, registry, data_dir = bad_flow_run
    assert state.is_failed()
    with pytest.raises(Exception) as failed:
        state.result()
    message = str(failed.value)
    assert "3 of 3 dataset(s) not published" in message
    assert re.search(re.escape(f"{name}-train") + r"[^\n]*" + re.escape(FLOW_CASES[name][1]), message), message
    assert read_production(registry, name) == OLD_VERSION
    assert list_versions(registry, name) == [OLD_VERSION]
    # Nothing but the old version and the pointer, and the night's line in the history (outcome failed).
    assert sorted(p.name for p in (registry / name).iterdir() if not p.name.startswith(".")) == sorted(
        [OLD_VERSION, POINTER, RUN_LOG_FILE, TREND_FILE])
    [entry] = read_run_log(registry, name)
    assert (entry.outcome, entry.stage) == ("failed", "validate")
    reports = list((data_dir / "runs" / name).glob("*/validation.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["passed"] is False
    assert (reports[0].parent / "data_docs" / "index.html").is_file()
