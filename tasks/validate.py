"""Stage 2: validate a dataset's train and test CSVs with Great Expectations before anything trains.

Per-pixel expectations (784 columns x N rows) are slow in GX, so the rows are first reduced with
NumPy to a few derived columns (row min/max, nulls, non-integers) and a one-row table of split
statistics; GX validates those, and NumPy then points at the offending cells of the rows GX flags.
Every run writes its drift numbers and GX results (``validation.json``) and the GX Data Docs
(``data_docs/index.html``) to the report folder, passed or failed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from prefect import task

from tasks import storage
from tasks.caching import VALIDATE_CACHE
from tasks.csvfile import (
    PARSE_BLOCK_BYTES,
    CsvFileError,
    data_span,
    decode_bytes,
    describe_arrow_error,
    read_bytes,
    read_head,
    sniff_columns,
    stream_strict,
)
from tasks.csvfile import read_text as read_text
from tasks.datasets import (
    COLUMNS,
    IMAGE_SIDE,
    LABEL_COLUMN,
    NUM_PIXELS,
    PIXEL_MAX,
    PIXEL_MIN,
    DatasetSpec,
    ImageProfile,
    Reference,
    Split,
)

PROFILE_FILE = "data_profile.json"
NOISE_SIGMAS = 2.0  # sampling noise allowed on top of max_mean_image_rmse, in standard errors
STATS_CHUNK_ROWS = 8192  # bounds the temporaries of the sum-of-squares pass
MAX_EXAMPLES = 5  # offending rows/lines quoted per failure
DOCS_DIRNAME = "data_docs"
DOCS_SITE = "train-mnist-run"
GX_LOGGERS = ("great_expectations", "great_expectations.data_context.types.base")


class DataValidationError(Exception):
    """The data failed validation; the message lists every failed check with what was observed."""

    def __init__(self, message: str, report_path: Path | None = None):
        super().__init__(message + (f"\nreport: {report_path}" if report_path else ""))
        self.report_path = report_path


@dataclass
class ParsedSplit:
    """A split's values and where each row came from."""

    matrix: np.ndarray  # (rows, 785): uint8 when every value is a byte, else float32 with NaN for empty cells
    first_line: int  # 1-based line number of the first data row
    lines: np.ndarray | None = None  # line number of each row; None when rows are consecutive lines
    bad_rows: list[tuple[int | None, int, str]] = field(default_factory=list)  # (line, fields, text) skipped

    def line_of(self, row: int) -> int:
        return int(self.lines[row]) if self.lines is not None else self.first_line + row


@dataclass
class SplitProfile:
    """What validation measured on one split."""

    has_header: bool
    rows: pd.DataFrame  # one row per image: label, row_min, row_max, row_nulls, row_non_integer
    stats: dict[str, float]
    label_counts: list[int]
    row_hashes: set[int] = field(repr=False)
    mean_image: np.ndarray | None = field(default=None, repr=False)  # (784,) float64, per-pixel mean

    def image_profile(self) -> ImageProfile:
        return ImageProfile(rows=int(self.stats["rows"]), pixel_std=round(float(self.stats["pixel_std"]), 4),
                            mean_image=tuple(round(float(v), 3) for v in self.mean_image))


# ---- reading -------------------------------------------------------------------------------------


def schema_problems(found: list[str], expected: list[str], has_header: bool) -> str:
    """What differs between the file's columns and the expected ones, in words."""
    if not has_header:
        return f"rows have {len(found)} fields, expected {len(expected)} ({expected[0]} + {len(expected) - 1} pixels)"
    parts = []
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    if missing:
        parts.append(f"missing columns {_few(missing)}")
    if extra:
        parts.append(f"unexpected columns {_few(extra)}")
    if not parts:
        moved = [(i, f, e) for i, (f, e) in enumerate(zip(found, expected, strict=False)) if f != e]
        parts.append("columns in the wrong order: " + ", ".join(
            f"position {i} has {f}, expected {e}" for i, f, e in moved[:MAX_EXAMPLES]))
    return "; ".join(parts)


def _few(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_EXAMPLES])
    return f"[{shown}{', ...' if len(items) > MAX_EXAMPLES else ''}] ({len(items)})"


def read_matrix(data: bytes, name: str, columns: list[str], has_header: bool) -> ParsedSplit:
    """Parse the CSV text leniently, to describe what is wrong; rows with a wrong field count are skipped
    and listed in ``bad_rows``. Only used after ``tasks.csvfile.stream_strict`` refused the file."""
    start, end = data_span(data, has_header)
    first_line = 1 + int(has_header)
    if start == 0 and has_header or start >= end:
        return ParsedSplit(np.zeros((0, len(columns)), np.uint8), first_line)
    buffer = pa.py_buffer(data)[start:end]
    for dtype in (pa.uint8(), pa.float32()):
        try:
            table, bad = _parse(buffer, columns, dtype, threads=True)
        except pa.ArrowInvalid as exc:
            if dtype == pa.uint8() and "conversion error" in str(exc):
                continue  # out-of-byte or fractional values: re-read as floats to report them
            raise DataValidationError(describe_arrow_error(buffer, name, columns, first_line, exc, dtype)) from exc
        if dtype == pa.uint8() and table.num_rows and any(col.null_count for col in table.columns):
            continue  # empty cells: float32 keeps them as NaN
        parsed = ParsedSplit(_table_to_matrix(table, np.uint8 if dtype == pa.uint8() else np.float32), first_line)
        if bad:
            if any(line is None for line, _, _ in bad):  # threaded parsing does not know line numbers
                _, bad = _parse(buffer, columns, dtype, threads=False, first_line=first_line)
            lines = np.arange(first_line, first_line + table.num_rows + len(bad))
            parsed.lines = np.setdiff1d(lines, [line for line, _, _ in bad], assume_unique=True)
            parsed.bad_rows = bad
        return parsed
    raise AssertionError("unreachable")


def _parse(buffer: pa.Buffer, columns: list[str], dtype: pa.DataType, threads: bool,
           first_line: int = 1) -> tuple[pa.Table, list[tuple[int | None, int, str]]]:
    """Parse data lines (no header); rows with a wrong field count are skipped and returned with their line."""
    bad: list[tuple[int | None, int, str]] = []

    def skip(row: Any) -> str:  # pyarrow knows line numbers only when parsing single-threaded
        bad.append((None if row.number is None else row.number + first_line - 1, row.actual_columns, row.text))
        return "skip"

    table = pacsv.read_csv(
        pa.BufferReader(buffer),
        read_options=pacsv.ReadOptions(column_names=columns, block_size=PARSE_BLOCK_BYTES, use_threads=threads),
        parse_options=pacsv.ParseOptions(invalid_row_handler=skip, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(columns, dtype)),
    )
    return table, sorted(bad, key=lambda b: b[0] or 0)


def _table_to_matrix(table: pa.Table, dtype: type) -> np.ndarray:
    """Row-major matrix of a table of same-typed columns (nulls as NaN), one record batch at a time."""
    matrix = np.empty((table.num_rows, table.num_columns), dtype=dtype)
    start = 0
    for batch in table.to_batches():
        tensor = batch.to_tensor(null_to_nan=dtype != np.uint8, row_major=True)
        matrix[start:start + batch.num_rows] = tensor.to_numpy()
        start += batch.num_rows
    return matrix


def _short(text: str) -> str:
    return text.strip().splitlines()[0][:300]


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
        filled = np.where(missing, np.float32(0), pixels)
        non_integer = (filled != np.round(filled)).sum(axis=1)
    n = len(matrix)
    row_max = filled.max(axis=1).astype(np.float64) if n else np.zeros(0)
    rows = pd.DataFrame({
        LABEL_COLUMN: labels,
        "row_min": filled.min(axis=1).astype(np.float64) if n else np.zeros(0),
        "row_max": row_max,
        "row_nulls": nulls,
        "row_non_integer": non_integer,
    })
    valid_labels = labels[np.isfinite(labels) & (labels >= 0) & (labels < num_classes) & (labels == np.round(labels))]
    counts = np.bincount(valid_labels.astype(np.int64), minlength=num_classes)[:num_classes]
    unique = {hash(row.tobytes()) for row in filled}
    mean, std = pixel_mean_std(filled) if n else (math.nan, math.nan)
    mean_image = filled.sum(axis=0, dtype=np.float64) / n if n else None
    stats = {
        "rows": float(n),
        "pixel_mean": mean,
        "pixel_std": std,
        "blank_share": float((row_max == 0).mean()) if n else math.nan,
        "duplicate_share": 1.0 - len(unique) / n if n else math.nan,
    }
    return SplitProfile(has_header=has_header, rows=rows, stats=stats, label_counts=counts.tolist(), row_hashes=unique,
                        mean_image=mean_image)


def mean_image_distance(a: ImageProfile, b: ImageProfile) -> dict[str, float]:
    """Root-mean-square difference of two mean images (grey levels) and the sampling noise expected of it.

    ``noise`` is the standard error of the difference of two means of values with the profiles' pixel
    std, an upper bound for every pixel's; the check allows ``NOISE_SIGMAS`` of it on top of the tolerance.
    A mirrored, flipped or shifted dataset moves the mean image by 10-20 grey levels; the real test
    splits are 2.0 (MNIST) and 0.6 (Fashion-MNIST) from their train splits.
    """
    first, second = np.asarray(a.mean_image), np.asarray(b.mean_image)
    rmse = float(np.sqrt(np.mean((first - second) ** 2)))
    noise = math.sqrt(a.pixel_std ** 2 / a.rows + b.pixel_std ** 2 / b.rows)
    return {"mean_image_rmse": rmse, "noise": noise}


def geometry_drift(spec: DatasetSpec, profiles: dict[str, SplitProfile | None],
                   champion: dict[str, ImageProfile] | None) -> dict[str, dict[str, float]]:
    """Mean-image distances of each split to the reference profile, to the champion's same split, and of
    test to train; each with the threshold it is checked against."""
    measured: dict[str, dict[str, float]] = {}
    current = {split: p.image_profile() for split, p in profiles.items() if p is not None and p.mean_image is not None}

    def add(name: str, a: ImageProfile, b: ImageProfile) -> None:
        distance = mean_image_distance(a, b)
        distance["threshold"] = spec.tolerances.max_mean_image_rmse + NOISE_SIGMAS * distance["noise"]
        measured[name] = distance

    reference = spec.reference.profile if spec.reference is not None else None
    for split, profile in current.items():
        if reference is not None:
            add(f"{split}_vs_reference", profile, reference)
        if champion and split in champion:
            add(f"{split}_vs_champion", profile, champion[split])
    if "train" in current and "test" in current:
        add("test_vs_train", current["test"], current["train"])
    return measured


def read_profile(path: Path | None) -> dict[str, ImageProfile] | None:
    """A published version's ``data_profile.json`` (per split), or None when there is none."""
    if path is None:
        return None
    data = json.loads(Path(path).read_text())
    return {split: ImageProfile.model_validate(value) for split, value in data.get("splits", {}).items()}


def write_profile(report_dir: Path, spec: DatasetSpec, profiles: dict[str, SplitProfile | None]) -> Path | None:
    """This run's data profile (per split), which publishing stores with the version."""
    splits = {split: p.image_profile().model_dump(mode="json") for split, p in profiles.items()
              if p is not None and p.mean_image is not None}
    if len(splits) != len(profiles):
        return None
    return _write_json(report_dir / PROFILE_FILE, {"dataset": spec.name, "image_side": IMAGE_SIDE,
                                                   "pixels": NUM_PIXELS, "splits": splits})


def pixel_mean_std(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of all pixels, without a float64 copy of the matrix."""
    count = pixels.size
    if pixels.dtype == np.uint8:  # exact integer sums: sum of squares of 784 bytes fits uint32 per element
        total = int(pixels.sum(dtype=np.uint64))
        squares = 0
        for start in range(0, len(pixels), STATS_CHUNK_ROWS):
            chunk = pixels[start:start + STATS_CHUNK_ROWS].astype(np.uint32)
            np.multiply(chunk, chunk, out=chunk)
            squares += int(chunk.sum(dtype=np.uint64))
        return total / count, math.sqrt((squares * count - total * total) / (count * count))
    mean = float(pixels.sum(dtype=np.float64) / count)
    deviation = 0.0
    for start in range(0, len(pixels), STATS_CHUNK_ROWS):
        chunk = pixels[start:start + STATS_CHUNK_ROWS].astype(np.float64) - mean
        deviation += float(np.einsum("ij,ij->", chunk, chunk))
    return mean, math.sqrt(deviation / count)


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
    kl = sum(p * math.log(p / q) if q > 0 else math.inf
             for p, q in zip(observed, expected, strict=True) if p > 0)
    ratio = min(p / q for p, q in zip(observed, expected, strict=True) if q > 0)
    return {"label_kl": kl, "min_class_share_ratio": ratio}


# ---- Great Expectations --------------------------------------------------------------------------
# Each expectation carries, in ``meta["check"]``, the problem it catches in words; failure messages
# and the Data Docs notes use it.


def _expect(kind: str, check: str, **kwargs: Any) -> Any:
    import great_expectations.expectations as gxe

    return getattr(gxe, kind)(meta={"check": check}, notes=check, **kwargs)


def _schema_expectations(expected_columns: list[str]) -> list:
    return [_expect("ExpectTableColumnsToMatchOrderedList", "column layout differs from label, pixel1..pixel784",
                    column_list=expected_columns)]


def _rows_expectations(spec: DatasetSpec, split: Split) -> list:
    expected_rows = spec.split(split).rows
    count = (_expect("ExpectTableRowCountToEqual", "row count differs from the pinned count", value=expected_rows)
             if expected_rows else
             _expect("ExpectTableRowCountToBeBetween", "no data rows", min_value=1))
    return [
        count,
        _expect("ExpectColumnValuesToNotBeNull", "label missing", column=LABEL_COLUMN),
        _expect("ExpectColumnValuesToBeInSet", f"label outside the classes 0..{spec.num_classes - 1}",
                column=LABEL_COLUMN, value_set=list(range(spec.num_classes))),
        _expect("ExpectColumnValuesToBeBetween", "empty pixel cells", column="row_nulls", max_value=0),
        _expect("ExpectColumnValuesToBeBetween", "non-integer pixel values", column="row_non_integer", max_value=0),
        _expect("ExpectColumnValuesToBeBetween", f"pixel value below {PIXEL_MIN}", column="row_min",
                min_value=PIXEL_MIN),
        _expect("ExpectColumnValuesToBeBetween", f"pixel value above {PIXEL_MAX}", column="row_max",
                max_value=PIXEL_MAX),
    ]


def _stats_expectations(spec: DatasetSpec, reference: Reference) -> list:
    tol = spec.tolerances
    mean, std = reference.pixel_mean, reference.pixel_std
    return [
        _expect("ExpectColumnValuesToBeBetween", "pixel mean drifted from the reference", column="pixel_mean",
                min_value=mean * (1 - tol.pixel_mean_rel_tol), max_value=mean * (1 + tol.pixel_mean_rel_tol)),
        _expect("ExpectColumnValuesToBeBetween", "pixel std drifted from the reference", column="pixel_std",
                min_value=std * (1 - tol.pixel_std_rel_tol), max_value=std * (1 + tol.pixel_std_rel_tol)),
        _expect("ExpectColumnValuesToBeBetween", "class balance drifted (label KL divergence from the reference)",
                column="label_kl", max_value=tol.max_label_kl),
        _expect("ExpectColumnValuesToBeBetween", "a class is under-represented (smallest observed/reference share)",
                column="min_class_share_ratio", min_value=tol.min_class_share_ratio),
        _expect("ExpectColumnValuesToBeBetween", "too many blank (all-zero) images", column="blank_share",
                max_value=tol.max_blank_share),
        _expect("ExpectColumnValuesToBeBetween", "too many exact duplicate images", column="duplicate_share",
                max_value=tol.max_duplicate_share),
    ]


def _pair_expectations(spec: DatasetSpec) -> list:
    return [
        _expect("ExpectColumnValuesToBeBetween", "test split overlaps the train split (test images found in train)",
                column="test_in_train_share", max_value=spec.tolerances.max_test_in_train_share),
        _expect("ExpectColumnValuesToBeBetween", "test split has more rows than train (splits swapped?)",
                column="test_to_train_rows", max_value=1.0),
    ]


def _geometry_expectations(geometry: dict[str, dict[str, float]]) -> list:
    return [_expect("ExpectColumnValuesToBeBetween",
                    f"mean image moved ({name.replace('_', ' ')}: mirrored, flipped, shifted or other images?)",
                    column=name, max_value=round(d["threshold"], 4)) for name, d in geometry.items()]


def quiet_gx_logging() -> None:
    """GX logs progress and config chatter at INFO/WARNING; keep only its errors."""
    for name in GX_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class GxRunner:
    """One ephemeral GX context for a validation run; each ``run`` validates a DataFrame against a suite."""

    def __init__(self) -> None:
        quiet_gx_logging()
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        quiet_gx_logging()
        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._source = self.context.data_sources.add_pandas("train-mnist")
        self.results: list[Any] = []

    def run(self, name: str, frame: pd.DataFrame, expectations: list) -> Any:
        gx = self._gx
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # The result is also kept in the context's validation results store, from which the docs are built.
        result = definition.run(batch_parameters={"dataframe": frame},
                                result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES})
        self.results.append(result)
        return result

    def build_docs(self, dest: Path) -> Path:
        """Render this run's suites and results as GX Data Docs in ``dest`` (replaced whole); returns index.html."""
        staging = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        for site in list(self.context.list_data_docs_sites()):  # the default site writes to a temp folder
            self.context.delete_data_docs_site(site)
        self.context.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(staging)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        try:
            self.context.build_data_docs(site_names=[DOCS_SITE])
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            if dest.exists():
                dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest / "index.html"


def describe_failures(suite_name: str, result: Any, locate: Any = None, found: str | None = None) -> list[str]:
    """One line per failed expectation: the problem, what was expected and what was found.

    ``locate(column, rows)`` may add where the offending values are (lines, pixel columns); ``found``
    replaces GX's observed value (for the schema, whose observed value is the whole column list).
    """
    lines = []
    for res in result.results:
        if res.success:
            continue
        cfg = res.expectation_config
        column = cfg.kwargs.get("column")
        check = (cfg.meta or {}).get("check", cfg.type)
        r = res.result or {}
        if found is not None:
            observed = found
        elif res.exception_info and res.exception_info.get("raised_exception"):
            observed = f"GX error: {res.exception_info.get('exception_message')}"
        elif r.get("unexpected_count") and locate is not None:
            rows = r.get("partial_unexpected_index_list") or []
            where = locate(column, rows) or f"data rows {rows} with {column} {_fmt(r.get('partial_unexpected_list'))}"
            observed = f"{r['unexpected_count']} of {r['element_count']} rows, e.g. {where}"
        elif r.get("partial_unexpected_list"):
            observed = _fmt_value(r["partial_unexpected_list"][0])
        else:
            observed = _fmt(r.get("observed_value"))
        what = f"{cfg.type}({column})" if column else cfg.type
        lines.append(f"{suite_name}: {check}: expected {_expected(cfg.kwargs)}; found {observed} [{what}]")
    return lines


def _expected(kwargs: dict[str, Any]) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if "column_list" in kwargs:
        cols = kwargs["column_list"]
        return f"{len(cols)} columns {cols[0]}, {cols[1]}, ..., {cols[-1]}"
    if "value_set" in kwargs:
        return f"a value in {_fmt(kwargs['value_set'])}"
    if "value" in kwargs:
        return f"== {kwargs['value']}"
    if low is not None and high is not None:
        return f"between {_fmt_value(low)} and {_fmt_value(high)}"
    if low is not None:
        return f">= {_fmt_value(low)}"
    if high is not None:
        return f"<= {_fmt_value(high)}"
    return "not null" if "column" in kwargs else _fmt(kwargs)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "empty"
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def _fmt(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 400 else text[:400] + "..."


class CellLocator:
    """Points at the offending cells of the rows GX flagged: line numbers and pixel columns with their values."""

    def __init__(self, parsed: ParsedSplit, columns: list[str]):
        self.parsed = parsed
        self.columns = columns

    def __call__(self, derived: str | None, rows: list[int]) -> str | None:
        matrix = self.parsed.matrix
        rows = [r for r in rows if isinstance(r, (int, np.integer)) and 0 <= r < len(matrix)]
        if not rows:
            return None
        if derived == LABEL_COLUMN:
            return ", ".join(f"line {self.parsed.line_of(r)} {LABEL_COLUMN}={_fmt_value(float(matrix[r, 0]))}"
                             for r in rows)
        tests = {
            "row_max": lambda v: v > PIXEL_MAX,
            "row_min": lambda v: v < PIXEL_MIN,
            "row_nulls": np.isnan,
            "row_non_integer": lambda v: np.isfinite(v) & (v != np.round(v)),
        }
        if derived not in tests:
            return None
        found = []
        for r in rows:
            values = matrix[r, 1:].astype(np.float64)
            bad = np.flatnonzero(tests[derived](values))
            cells = ", ".join(f"{self.columns[1 + c]}={_fmt_value(float(values[c]))}" for c in bad[:3])
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            found.append(f"line {self.parsed.line_of(r)} {cells}{more}")
        return "; ".join(found)


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
    docs_path: Path | None = None  # GX Data Docs index.html, if it could be built
    profile_path: Path | None = None  # data_profile.json: stored with the version if this run publishes


def validate_split(spec: DatasetSpec, split: Split, path: Path, gx_runner: GxRunner,
                   failures: list[str]) -> SplitProfile | None:
    """Schema, parse and row checks for one split; returns its profile, or None if it cannot be read."""
    name = f"{spec.name}-{split}"
    where = f"{name} ({path.name})"
    try:
        columns, has_header = sniff_columns(read_head(path), where, spec.header)
    except CsvFileError as exc:
        failures.append(str(exc))
        return None
    # An empty frame with the file's columns; one uint8 block, since GX fingerprints every column of a batch.
    header_frame = pd.DataFrame(np.zeros((0, len(columns)), np.uint8), columns=columns)
    schema = gx_runner.run(f"{name}-schema", header_frame, _schema_expectations(list(COLUMNS)))
    if not schema.success:
        detail = schema_problems(columns, list(COLUMNS), has_header)
        failures.extend(describe_failures(f"{name}-schema", schema, found=detail))
        return None
    before = len(failures)
    strict_problem = None
    try:
        raw = read_bytes(path)
    except CsvFileError as exc:
        failures.append(f"{where}: {exc}")
        return None
    try:  # the one reader, as conversion will read the file
        parsed = ParsedSplit(_table_to_matrix(stream_strict(raw, where, columns, has_header), np.uint8),
                             1 + int(has_header))
    except CsvFileError as exc:
        strict_problem = str(exc)  # named below, unless the careful read names the problem itself
        try:
            data, truncated = decode_bytes(raw, path.name)
        except CsvFileError as again:
            failures.append(str(again))
            return None
        if truncated:
            failures.append(f"{name}: {truncated}")
        try:
            parsed = read_matrix(data, where, columns, has_header)
        except DataValidationError as again:
            failures.append(str(again))
            return None
        del data
    del raw
    if parsed.bad_rows:
        examples = ", ".join(f"line {line} has {fields} fields" for line, fields, _ in parsed.bad_rows[:MAX_EXAMPLES])
        failures.append(f"{where}: {len(parsed.bad_rows)} row(s) with the wrong number of fields, expected "
                        f"{len(COLUMNS)} (truncated or malformed rows, skipped): {examples}")
    profile = profile_split(parsed.matrix, spec.num_classes, has_header)
    rows = gx_runner.run(f"{name}-rows", profile.rows, _rows_expectations(spec, split))
    failures.extend(describe_failures(f"{name}-rows", rows, CellLocator(parsed, columns)))
    if strict_problem is not None and len(failures) == before:
        # The one reader refused the file: conversion would fail, so validation must too.
        failures.append(strict_problem)
    if not len(parsed.matrix):
        failures.append(f"{where}: no data rows" + (" after the header (header-only file)" if has_header else ""))
        return None
    return profile


def validate_dataset(spec: DatasetSpec, train_path: Path, test_path: Path, report_dir: Path,
                     champion_profile: dict[str, ImageProfile] | None = None) -> ValidationReport:
    """Validate both splits and their relation; write ``validation.json``, ``data_profile.json`` and Data Docs;
    raise if anything failed.

    ``champion_profile`` is the production version's data profile (``read_profile``), or None: each
    split's mean image is then also compared with the champion's, which covers datasets without a
    reference profile.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    runner = GxRunner()
    failures: list[str] = []
    profiles = {split: validate_split(spec, split, path, runner, failures)
                for split, path in (("train", train_path), ("test", test_path))}
    drift: dict[str, Any] = {}
    reference = spec.reference
    if reference is None and profiles["train"] is not None:
        try:
            reference = reference_from_profile(profiles["train"])
            drift["reference_computed_from_train"] = reference.model_dump(mode="json")
        except ValueError as exc:
            failures.append(f"{spec.name}-train: cannot compute reference statistics from train: {_short(str(exc))}")
    for split, profile in profiles.items():
        if profile is None:
            continue
        stats: dict[str, Any] = dict(profile.stats)
        if reference is not None:
            stats.update(label_drift(profile.label_counts, reference))
        drift[split] = {**stats, "label_counts": profile.label_counts}
        if reference is not None:
            result = runner.run(f"{spec.name}-{split}-stats", pd.DataFrame([stats]), _stats_expectations(spec, reference))
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
    geometry = geometry_drift(spec, profiles, champion_profile)
    drift["geometry"] = geometry
    if champion_profile is None:
        drift["geometry_champion"] = "no champion profile (first version, or one published before profiles)"
    if geometry:
        row = {name: d["mean_image_rmse"] for name, d in geometry.items()}
        result = runner.run(f"{spec.name}-geometry", pd.DataFrame([row]), _geometry_expectations(geometry))
        failures.extend(describe_failures(f"{spec.name}-geometry", result))
    profile_path = write_profile(report_dir, spec, profiles)
    docs_path, docs_error = None, None
    try:
        docs_path = runner.build_docs(report_dir / DOCS_DIRNAME)
    except Exception as exc:  # noqa: BLE001 - the docs are a view; the verdict and validation.json must not depend on them
        docs_error = f"{type(exc).__name__}: {_short(str(exc))}"
    report_path = write_report(report_dir, spec, failures, drift, runner.results, docs_path, docs_error)
    layouts = {split: p.has_header for split, p in profiles.items() if p is not None}
    report = ValidationReport(spec.name, not failures, failures, drift, report_path, layouts, docs_path, profile_path)
    if failures:
        raise DataValidationError(
            f"{spec.name}: data failed validation ({len(failures)} problem(s)):\n- " + "\n- ".join(failures),
            report_path,
        )
    return report


def write_report(report_dir: Path, spec: DatasetSpec, failures: list[str], drift: dict[str, Any],
                 results: list[Any], docs_path: Path | None = None, docs_error: str | None = None) -> Path:
    """Write the run's validation report (drift numbers and GX results) atomically."""
    report = {
        "dataset": spec.name,
        "passed": not failures,
        "failures": failures,
        "drift": drift,
        "data_docs": str(docs_path) if docs_path else None,
        **({"data_docs_error": docs_error} if docs_error else {}),
        "great_expectations": [r.to_json_dict() for r in results],
    }
    return _write_json(report_dir / "validation.json", report)


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    """Strict JSON (NaN and infinities as strings), written atomically."""
    return storage.write_text(path, json.dumps(_finite(data), indent=2, default=_json_default))


def report_in_run_dir(report: ValidationReport, run_dir: Path) -> ValidationReport:
    """The run's folder always holds its ``validation.json``.

    A validation served from cache points at the report of the run that validated these bytes; it is
    copied into this run's folder with ``served_from_cache`` naming the original.
    """
    target = run_dir / "validation.json"
    if report.report_path == target:
        return report
    data = json.loads(report.report_path.read_text())
    data["served_from_cache"] = str(report.report_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    profile_path = report.profile_path
    if profile_path is not None and profile_path.is_file():
        profile_path = _write_json(run_dir / PROFILE_FILE, json.loads(profile_path.read_text()))
    return replace(report, report_path=_write_json(target, data), profile_path=profile_path)


def _finite(value: Any) -> Any:
    """NaN and infinities as strings, so validation.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return _finite(value.item())
    return str(value)


# ---- Prefect wrapper -----------------------------------------------------------------------------


@task(name="validate", task_run_name="validate-{spec.name}", cache_policy=VALIDATE_CACHE, persist_result=True)
def validate_task(spec: DatasetSpec, train_path: Path, test_path: Path, report_dir: Path,
                  champion_profile: Path | None = None) -> ValidationReport:
    from prefect import get_run_logger

    from tasks.validation_report import write_validation_html

    logger = get_run_logger()
    try:
        report = validate_dataset(spec, train_path, test_path, report_dir, read_profile(champion_profile))
    except DataValidationError as exc:
        if exc.report_path is not None:
            write_validation_html(exc.report_path)  # the offline view of what failed; the flow logs the failure
        raise
    logger.info("%s passed validation; drift %s; report %s; data docs %s", spec.name,
                {s: {k: round(v, 4) for k, v in d.items() if isinstance(v, float)} for s, d in report.drift.items()
                 if s in ("train", "test")}, report.report_path, report.docs_path)
    return report
