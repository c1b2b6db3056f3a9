"""Stage 2: validate a dataset's train and test CSVs with Great Expectations before anything trains.

Per-pixel expectations (784 columns x N rows) are slow in GX, so the rows are first reduced with
NumPy to a few derived columns (row min/max, nulls, non-integers) and a one-row table of split
statistics; GX validates those. Every run writes its drift numbers and GX results to the report
folder, passed or failed.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from prefect import task

from tasks.datasets import (
    COLUMNS,
    LABEL_COLUMN,
    PIXEL_MAX,
    PIXEL_MIN,
    DatasetSpec,
    Reference,
    Split,
)

SNIFF_BYTES = 64 * 1024


class DataValidationError(Exception):
    """The data failed validation; the message lists every failed check with what was observed."""

    def __init__(self, message: str, report_path: Path | None = None):
        super().__init__(message + (f"\nreport: {report_path}" if report_path else ""))
        self.report_path = report_path


@dataclass
class SplitProfile:
    """What validation measured on one split."""

    has_header: bool
    rows: pd.DataFrame  # one row per image: label, row_min, row_max, row_nulls, row_non_integer
    stats: dict[str, float]
    label_counts: list[int]
    row_hashes: set[int] = field(repr=False)


# ---- reading -------------------------------------------------------------------------------------


def _open_text_head(path: Path) -> bytes:
    """First bytes of the (possibly gzip-compressed) file, decompressed."""
    raw = path.read_bytes()[:SNIFF_BYTES] if path.stat().st_size else b""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return zlib.decompressobj(wbits=31).decompress(raw, SNIFF_BYTES)
    except zlib.error as exc:
        raise DataValidationError(f"{path.name}: corrupt gzip stream: {exc}") from exc


def sniff_columns(path: Path, header: bool | None) -> tuple[list[str], bool]:
    """Column names of the CSV (from its header, or generated) and whether it has a header row.

    Fails early, with what was found, on empty files and on documents that are not CSV at all.
    """
    head = _open_text_head(path)
    if not head.strip():
        raise DataValidationError(f"{path.name}: file is empty (no header, no rows)")
    try:
        first_line = head.split(b"\n", 1)[0].decode("utf-8").strip("\r\n\ufeff ")
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{path.name}: not a text CSV (first line is not UTF-8)") from exc
    if first_line[:1] in ("<", "{", "["):
        kind = "an HTML page" if first_line[:1] == "<" else "a JSON document"
        raise DataValidationError(f"{path.name}: looks like {kind}, not CSV; first line: {first_line[:120]!r}")
    fields = [f.strip().strip('"') for f in first_line.split(",")]
    detected_header = not _is_number(fields[0])
    if header is not None and header != detected_header:
        expected = "a header row" if header else "no header row"
        raise DataValidationError(f"{path.name}: expected {expected}; first line: {first_line[:120]!r}")
    if detected_header:
        return fields, True
    return [LABEL_COLUMN] + [f"pixel{i}" for i in range(1, len(fields))], False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_matrix(path: Path, columns: list[str], has_header: bool) -> np.ndarray:
    """All values as an (rows, columns) array: uint8 when every value is a byte, else float32 with NaN."""
    read = pacsv.ReadOptions(column_names=columns, skip_rows=1 if has_header else 0, block_size=1 << 24)
    for dtype in (pa.uint8(), pa.float32()):
        convert = pacsv.ConvertOptions(column_types={c: dtype for c in columns}, strings_can_be_null=True)
        try:
            table = pacsv.read_csv(path, read_options=read, convert_options=convert)
        except pa.ArrowInvalid as exc:
            if dtype == pa.uint8() and "CSV conversion error" in str(exc):
                continue  # out-of-byte or fractional values: re-read as floats to report them
            raise DataValidationError(f"{path.name}: cannot parse as CSV of numbers: {_short(exc)}") from exc
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataValidationError(f"{path.name}: cannot read (truncated or corrupt file?): {_short(exc)}") from exc
        if dtype == pa.uint8() and table.num_rows and any(col.null_count for col in table.columns):
            continue  # empty cells: float32 keeps them as NaN
        return _table_to_matrix(table, np.uint8 if dtype == pa.uint8() else np.float32)
    raise AssertionError("unreachable")


def _table_to_matrix(table: pa.Table, dtype: type) -> np.ndarray:
    matrix = np.empty((table.num_rows, table.num_columns), dtype=dtype)
    for i, column in enumerate(table.columns):
        matrix[:, i] = column.to_numpy(zero_copy_only=False) if column.null_count else column.to_numpy()
    return matrix


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300]


# ---- profiling -----------------------------------------------------------------------------------


def profile_split(matrix: np.ndarray, num_classes: int, has_header: bool = False) -> SplitProfile:
    """Reduce an (N, 785) matrix to per-row checks and split statistics."""
    labels = matrix[:, 0].astype(np.float64)
    pixels = matrix[:, 1:]
    if pixels.dtype == np.uint8:
        nulls = np.zeros(len(pixels), dtype=np.int64)
        non_integer = nulls
        filled = pixels
    else:
        missing = np.isnan(pixels)
        nulls = missing.sum(axis=1)
        filled = np.where(missing, 0, pixels)
        non_integer = (filled != np.round(filled)).sum(axis=1)
    rows = pd.DataFrame({
        LABEL_COLUMN: labels,
        "row_min": filled.min(axis=1).astype(np.float64),
        "row_max": filled.max(axis=1).astype(np.float64),
        "row_nulls": nulls,
        "row_non_integer": non_integer,
    })
    valid_labels = labels[np.isfinite(labels) & (labels >= 0) & (labels < num_classes) & (labels == np.round(labels))]
    counts = np.bincount(valid_labels.astype(np.int64), minlength=num_classes)[:num_classes]
    hashes = [hash(row.tobytes()) for row in filled]
    unique = set(hashes)
    n = len(matrix)
    stats = {
        "rows": float(n),
        "pixel_mean": float(filled.mean(dtype=np.float64)) if n else math.nan,
        "pixel_std": float(filled.std(dtype=np.float64)) if n else math.nan,
        "blank_share": float((rows["row_max"] == 0).mean()) if n else math.nan,
        "duplicate_share": 1.0 - len(unique) / n if n else math.nan,
    }
    return SplitProfile(has_header=has_header, rows=rows, stats=stats, label_counts=counts.tolist(), row_hashes=unique)


def reference_from_profile(profile: SplitProfile) -> Reference:
    """Reference statistics computed from a (train) split, for datasets that pin none."""
    return Reference(
        class_counts=tuple(float(c) for c in profile.label_counts),
        pixel_mean=profile.stats["pixel_mean"],
        pixel_std=profile.stats["pixel_std"],
    )


def label_drift(counts: list[int], reference: Reference) -> dict[str, float]:
    """KL(observed || reference) of the label distribution and the smallest observed/reference class share."""
    total = sum(counts)
    if not total:
        return {"label_kl": math.inf, "min_class_share_ratio": 0.0}
    observed = [c / total for c in counts]
    expected = reference.class_proportions
    kl = sum(p * math.log(p / q) for p, q in zip(observed, expected, strict=True) if p > 0)
    ratio = min(p / q for p, q in zip(observed, expected, strict=True))
    return {"label_kl": kl, "min_class_share_ratio": ratio}


# ---- Great Expectations --------------------------------------------------------------------------


def _schema_expectations(expected_columns: list[str]) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectTableColumnsToMatchOrderedList(column_list=expected_columns)]


def _rows_expectations(spec: DatasetSpec, split: Split) -> list:
    import great_expectations.expectations as gxe

    expected_rows = spec.split(split).rows
    count = (gxe.ExpectTableRowCountToEqual(value=expected_rows) if expected_rows
             else gxe.ExpectTableRowCountToBeBetween(min_value=1))
    return [
        count,
        gxe.ExpectColumnValuesToNotBeNull(column=LABEL_COLUMN),
        gxe.ExpectColumnValuesToBeInSet(column=LABEL_COLUMN, value_set=list(range(spec.num_classes))),
        gxe.ExpectColumnValuesToBeBetween(column="row_nulls", max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="row_non_integer", max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="row_min", min_value=PIXEL_MIN),
        gxe.ExpectColumnValuesToBeBetween(column="row_max", max_value=PIXEL_MAX),
    ]


def _stats_expectations(spec: DatasetSpec, reference: Reference) -> list:
    import great_expectations.expectations as gxe

    tol = spec.tolerances
    mean, std = reference.pixel_mean, reference.pixel_std
    return [
        gxe.ExpectColumnValuesToBeBetween(column="pixel_mean", min_value=mean * (1 - tol.pixel_mean_rel_tol),
                                          max_value=mean * (1 + tol.pixel_mean_rel_tol)),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=std * (1 - tol.pixel_std_rel_tol),
                                          max_value=std * (1 + tol.pixel_std_rel_tol)),
        gxe.ExpectColumnValuesToBeBetween(column="label_kl", max_value=tol.max_label_kl),
        gxe.ExpectColumnValuesToBeBetween(column="min_class_share_ratio", min_value=tol.min_class_share_ratio),
        gxe.ExpectColumnValuesToBeBetween(column="blank_share", max_value=tol.max_blank_share),
        gxe.ExpectColumnValuesToBeBetween(column="duplicate_share", max_value=tol.max_duplicate_share),
    ]


def _pair_expectations(spec: DatasetSpec) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(column="test_in_train_share",
                                          max_value=spec.tolerances.max_test_in_train_share),
        # A test split larger than the train split means the two were swapped.
        gxe.ExpectColumnValuesToBeBetween(column="test_to_train_rows", max_value=1.0),
    ]


class GxRunner:
    """One ephemeral GX context for a validation run; each ``run`` validates a DataFrame against a suite."""

    def __init__(self, docs_dir: Path | None = None):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._source = self.context.data_sources.add_pandas("train-mnist")
        self.results: list[Any] = []
        self.docs_dir = docs_dir

    def run(self, name: str, frame: pd.DataFrame, expectations: list) -> Any:
        gx = self._gx
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame},
                                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5})
        self.results.append(result)
        return result


def describe_failures(suite_name: str, result: Any) -> list[str]:
    """One line per failed expectation: what was expected and what was observed."""
    lines = []
    for res in result.results:
        if res.success:
            continue
        cfg = res.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "column")}
        column = cfg.kwargs.get("column")
        what = f"{cfg.type}({column})" if column else cfg.type
        r = res.result or {}
        if res.exception_info and res.exception_info.get("raised_exception"):
            found = f"error: {res.exception_info.get('exception_message')}"
        elif r.get("unexpected_count"):
            rows = r.get("partial_unexpected_index_list") or []
            values = r.get("partial_unexpected_list") or []
            found = f"{r['unexpected_count']} of {r.get('element_count')} rows fail, e.g. data rows {rows} values {values}"
        else:
            found = f"observed {_fmt(r.get('observed_value'))}"
            if r.get("details"):
                found += f" {_fmt(r['details'])}"
        lines.append(f"{suite_name}: {what} expected {_fmt(kwargs)}; {found}")
    return lines


def _fmt(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 400 else text[:400] + "..."


# ---- the stage -----------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """The outcome of validating a dataset: where the report is and what drifted."""

    dataset: str
    passed: bool
    failures: list[str]
    drift: dict[str, Any]
    report_path: Path
    has_header: dict[str, bool]  # per split, as detected


def validate_split(spec: DatasetSpec, split: Split, path: Path, gx_runner: GxRunner,
                   failures: list[str]) -> SplitProfile | None:
    """Schema, parse and row checks for one split; returns its profile, or None if it cannot be read."""
    name = f"{spec.name}-{split}"
    try:
        columns, has_header = sniff_columns(path, spec.header)
    except DataValidationError as exc:
        failures.append(f"{name}: {exc}")
        return None
    schema = gx_runner.run(f"{name}-schema", pd.DataFrame(columns=columns), _schema_expectations(list(COLUMNS)))
    if not schema.success:
        failures.extend(describe_failures(f"{name}-schema", schema))
        return None
    try:
        matrix = read_matrix(path, columns, has_header)
    except DataValidationError as exc:
        failures.append(f"{name}: {exc}")
        return None
    profile = profile_split(matrix, spec.num_classes, has_header)
    rows = gx_runner.run(f"{name}-rows", profile.rows, _rows_expectations(spec, split))
    failures.extend(describe_failures(f"{name}-rows", rows))
    return profile


def validate_dataset(spec: DatasetSpec, train_path: Path, test_path: Path, report_dir: Path) -> ValidationReport:
    """Validate both splits and their relation; write ``validation.json``; raise if anything failed."""
    report_dir.mkdir(parents=True, exist_ok=True)
    runner = GxRunner()
    failures: list[str] = []
    profiles = {split: validate_split(spec, split, path, runner, failures)
                for split, path in (("train", train_path), ("test", test_path))}
    drift: dict[str, Any] = {}
    reference = spec.reference
    if reference is None and profiles["train"] is not None:
        reference = reference_from_profile(profiles["train"])
        drift["reference_computed_from_train"] = reference.model_dump()
    for split, profile in profiles.items():
        if profile is None or reference is None:
            continue
        stats = {**profile.stats, **label_drift(profile.label_counts, reference), "label_counts": profile.label_counts}
        drift[split] = stats
        frame = pd.DataFrame([{k: v for k, v in stats.items() if k != "label_counts"}])
        result = runner.run(f"{spec.name}-{split}-stats", frame, _stats_expectations(spec, reference))
        failures.extend(describe_failures(f"{spec.name}-{split}-stats", result))
    train, test = profiles["train"], profiles["test"]
    if train is not None and test is not None:
        n_test = test.stats["rows"]
        pair = {
            "test_in_train_share": len(test.row_hashes & train.row_hashes) / n_test if n_test else 0.0,
            "test_to_train_rows": n_test / train.stats["rows"] if train.stats["rows"] else math.inf,
        }
        drift["pair"] = pair
        result = runner.run(f"{spec.name}-pair", pd.DataFrame([pair]), _pair_expectations(spec))
        failures.extend(describe_failures(f"{spec.name}-pair", result))
    report_path = write_report(report_dir, spec, failures, drift, runner.results)
    layouts = {split: p.has_header for split, p in profiles.items() if p is not None}
    report = ValidationReport(spec.name, not failures, failures, drift, report_path, layouts)
    if failures:
        raise DataValidationError(
            f"{spec.name}: data failed validation ({len(failures)} problem(s)):\n- " + "\n- ".join(failures),
            report_path,
        )
    return report


def write_report(report_dir: Path, spec: DatasetSpec, failures: list[str], drift: dict[str, Any],
                 results: list[Any]) -> Path:
    """Write the run's validation report (drift numbers and GX results) atomically."""
    report = {
        "dataset": spec.name,
        "passed": not failures,
        "failures": failures,
        "drift": drift,
        "great_expectations": [r.to_json_dict() for r in results],
    }
    path = report_dir / "validation.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


# ---- Prefect wrapper -----------------------------------------------------------------------------


@task(name="validate", task_run_name="validate-{spec.name}")
def validate_task(spec: DatasetSpec, train_path: Path, test_path: Path, report_dir: Path) -> ValidationReport:
    from prefect import get_run_logger

    logger = get_run_logger()
    try:
        report = validate_dataset(spec, train_path, test_path, report_dir)
    except DataValidationError as exc:
        logger.error("%s", exc)
        raise
    logger.info("%s passed validation; drift %s; report %s", spec.name,
                {s: {k: round(v, 4) for k, v in d.items() if isinstance(v, float)} for s, d in report.drift.items()
                 if s in ("train", "test")}, report.report_path)
    return report
