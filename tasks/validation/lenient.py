"""Validation's careful reader: after the one reader (``tasks.validation.csvfile``) refused a file, it reads
the file leniently to say what is wrong (which line, which field count, which cells), and the split's
values as a matrix that the row checks and their messages point into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.validation import DataValidationError
from tasks.validation.csvfile import PARSE_BLOCK_BYTES, data_span, describe_arrow_error

MAX_EXAMPLES = 5  # offending rows/lines quoted per failure


@dataclass
class ParsedSplit:
    """A split's values and where each row came from."""

    matrix: np.ndarray  # (rows, 785): uint8 when every value is a byte, else float32 with NaN for empty cells
    first_line: int  # 1-based line number of the first data row
    lines: np.ndarray | None = None  # line number of each row; None when rows are consecutive lines
    bad_rows: list[tuple[int | None, int, str]] = field(default_factory=list)  # (line, fields, text) skipped

    def line_of(self, row: int) -> int:
        return int(self.lines[row]) if self.lines is not None else self.first_line + row


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
    and listed in ``bad_rows``. Only used after ``tasks.validation.csvfile.stream_strict`` refused the file."""
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
        parsed = ParsedSplit(table_to_matrix(table, np.uint8 if dtype == pa.uint8() else np.float32), first_line)
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


def table_to_matrix(table: pa.Table, dtype: type) -> np.ndarray:
    """Row-major matrix of a table of same-typed columns (nulls as NaN), one record batch at a time."""
    matrix = np.empty((table.num_rows, table.num_columns), dtype=dtype)
    start = 0
    for batch in table.to_batches():
        tensor = batch.to_tensor(null_to_nan=dtype != np.uint8, row_major=True)
        matrix[start:start + batch.num_rows] = tensor.to_numpy()
        start += batch.num_rows
    return matrix
