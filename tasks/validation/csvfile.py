"""The one CSV reader: what a split file is and which values are legal, for validation and conversion alike.

A value is legal when pyarrow's uint8 conversion accepts it: plain integers 0..255 (``121.0``, ``+217``
or ``2.17e2`` are not). Validation passes a split only if ``stream_strict`` reads it, and conversion
writes exactly what ``stream_strict`` returns, so a file that passes validation always converts to the
same matrix. ``decode_bytes`` + ``parse_strict`` apply the same rules to a text in memory, to name the
problems of a refused file. How bytes become text (gzip, limits) is ``tasks.validation.decoding``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.datasets import LABEL_COLUMN
from tasks.validation.decoding import (  # noqa: F401 - re-exported: the reader's whole interface in one place
    MAX_TEXT_BYTES,
    SNIFF_BYTES,
    CsvFileError,
    TextStream,
    decode_bytes,
    is_gzip,
    read_bytes,
    read_head,
    read_text,
)

UTF8_BOM = b"\xef\xbb\xbf"
PARSE_BLOCK_BYTES = 4 << 20  # smaller blocks parse faster than 16 MB ones and spread over threads

def stream_strict(raw: bytes, name: str, columns: list[str], has_header: bool,
                  max_text_bytes: int | None = None) -> pa.Table:
    """``parse_strict`` of the decoded text of ``raw``, streamed (the fast path of both stages)."""
    stream = TextStream(raw, name, max_text_bytes)
    options = dict(
        read_options=pacsv.ReadOptions(column_names=columns, skip_rows=int(has_header), block_size=PARSE_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(columns, pa.uint8())),
    )
    try:
        table = pacsv.read_csv(pa.PythonFile(stream, mode="r"), **options)
    except CsvFileError:
        raise
    except pa.ArrowInvalid as exc:
        # Name the value and line from the decoded text (only for files that are refused anyway).
        data, _ = decode_bytes(raw, name, max_text_bytes)
        try:
            parse_strict(data, name, columns, has_header)
        except CsvFileError as named:
            raise named from exc
        raise CsvFileError(f"{name}: cannot parse as CSV of numbers: {str(exc).strip().splitlines()[0][:300]}") from exc
    for index, column in enumerate(table.columns):
        if column.null_count:
            raise CsvFileError(f"{name}: empty cells in column {columns[index]}; expected integers 0..255")
    return table


def sniff_columns(data: bytes, name: str, header: bool | None) -> tuple[list[str], bool]:
    """Column names of the CSV (from its header, or generated) and whether it has a header row.

    Fails early, with what was found, on empty files and on documents that are not CSV at all.
    """
    head = data[:SNIFF_BYTES].lstrip(UTF8_BOM + b" \t\r\n")
    if not head:
        raise CsvFileError(f"{name}: file is empty (no header, no rows)")
    if head[:1] in (b"<", b"{", b"["):
        kind = "an HTML page" if head[:1] == b"<" else "a JSON document"
        raise CsvFileError(f"{name}: looks like {kind}, not CSV; starts with {quote(head)}")
    try:
        first_line = re.split(rb"\r\n|\r|\n", head, maxsplit=1)[0].decode("utf-8").strip(" ")
    except UnicodeDecodeError as exc:
        raise CsvFileError(f"{name}: not a text CSV (first line is not UTF-8); starts with {head[:40]!r}") from exc
    fields = [f.strip().strip('"') for f in first_line.split(",")]
    detected_header = not _is_number(fields[0])
    if header is not None and header != detected_header:
        expected = "a header row" if header else "no header row"
        raise CsvFileError(f"{name}: expected {expected}; first line: {quote(first_line)}")
    if detected_header:
        return fields, True
    return [LABEL_COLUMN] + [f"pixel{i}" for i in range(1, len(fields))], False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def quote(text: str | bytes, limit: int = 120) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def data_span(data: bytes, has_header: bool) -> tuple[int, int]:
    """Start and end of the data lines: after the header line, before trailing blank lines (which are harmless)."""
    start = 0
    if has_header:
        found = re.search(rb"\r\n|\r|\n", data)
        start = found.end() if found else len(data)
    end = len(data)
    while end > start and data[end - 1] in b"\r\n\t ":
        end -= 1
    return start, end


def parse_strict(data: bytes, name: str, columns: list[str], has_header: bool) -> pa.Table:
    """The split as a table of uint8 columns, or ``CsvFileError`` naming the first illegal value or row."""
    start, end = data_span(data, has_header)
    buffer = pa.py_buffer(data)[start:end]
    options = dict(
        read_options=pacsv.ReadOptions(column_names=columns, block_size=PARSE_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(columns, pa.uint8())),
    )
    try:
        table = pacsv.read_csv(pa.BufferReader(buffer), **options)
    except pa.ArrowInvalid as exc:
        raise CsvFileError(describe_arrow_error(buffer, name, columns, 1 + int(has_header), exc)) from exc
    for index, column in enumerate(table.columns):
        if column.null_count:
            raise CsvFileError(f"{name}: empty cells in column {columns[index]}; expected integers 0..255")
    return table


def describe_arrow_error(buffer: pa.Buffer, name: str, columns: list[str], first_line: int,
                         exc: pa.ArrowInvalid, dtype: pa.DataType | None = None) -> str:
    """Name the column, line and value pyarrow refused (single-threaded parsing knows the line).

    ``dtype`` is the type the values were read as: uint8 (the strict reader) or float32 (the careful
    re-read of validation, whose refusals are not numbers at all).
    """
    dtype = dtype or pa.uint8()
    message = str(exc)
    if "Row #" not in message and "conversion error" in message:
        try:
            pacsv.read_csv(pa.BufferReader(buffer),
                           read_options=pacsv.ReadOptions(column_names=columns, use_threads=False),
                           parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                           convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(columns, dtype)))
        except pa.ArrowInvalid as again:
            message = str(again)
    found = re.search(r"column #(\d+): (?:Row #(\d+): )?CSV conversion error to \w+: invalid value '(.*)'", message)
    if found:
        column, row, value = found.groups()
        where = f" at line {int(row) + first_line - 1}" if row else ""
        if dtype != pa.uint8():
            return f"{name}: non-numeric value {value[:40]!r} in column {columns[int(column)]}{where}; expected integers"
        return (f"{name}: value {value[:40]!r} in column {columns[int(column)]}{where} is not a plain integer "
                f"0..255 (write pixels and labels as digits only, e.g. 121, not 121.0, +121 or 1.21e2)")
    return f"{name}: cannot parse as CSV of numbers: {message.strip().splitlines()[0][:300]}"


def read_split_table(path: Path, columns: list[str], has_header: bool, expected_sha256: str | None = None,
                     max_text_bytes: int | None = None) -> pa.Table:
    """Read a whole split strictly (what conversion writes): verified bytes, decoded, parsed as uint8."""
    return stream_strict(read_bytes(path, expected_sha256, max_text_bytes), Path(path).name, columns, has_header,
                         max_text_bytes)
