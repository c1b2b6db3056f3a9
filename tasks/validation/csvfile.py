"""The one CSV reader: what a split file is and which values are legal, for validation and conversion alike.

A file is gzip when its first bytes are the gzip magic, whatever its name. Concatenated gzip members
form one stream; anything else after the stream is an error, and so is a text larger than
``MAX_TEXT_BYTES`` (a gzip bomb fails at the limit, having held at most the limit in memory). A value is
legal when pyarrow's uint8 conversion accepts it: plain integers 0..255 (``121.0``, ``+217`` or ``2.17e2``
are not). Validation passes a split only if ``stream_strict`` reads it, and conversion writes exactly
what ``stream_strict`` returns, so a file that passes validation always converts to the same matrix.
``decode_bytes`` + ``parse_strict`` apply the same rules to a text in memory, to name the problems of
a refused file.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.datasets import LABEL_COLUMN

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
SNIFF_BYTES = 64 * 1024
INFLATE_CHUNK_BYTES = 16 << 20
PARSE_BLOCK_BYTES = 4 << 20  # smaller blocks parse faster than 16 MB ones and spread over threads
# A 60k-row split of 785 three-digit values is at most ~190 MB of text; the real MNIST train split is 109 MB.
MAX_TEXT_BYTES = 512 << 20


class CsvFileError(ValueError):
    """The file is not a readable split: corrupt or oversized compression, or values that are not bytes."""


def is_gzip(head: bytes) -> bool:
    return head[:2] == GZIP_MAGIC


def read_head(path: Path) -> bytes:
    """The first ``SNIFF_BYTES`` of the file's text (gunzipped if gzip-compressed), to sniff its layout."""
    with open(path, "rb") as fh:
        raw = fh.read(SNIFF_BYTES)
        if not is_gzip(raw):
            return raw
        decoder, head = zlib.decompressobj(wbits=31), b""
        while len(head) < SNIFF_BYTES and raw and not decoder.eof:
            try:
                head += decoder.decompress(raw, SNIFF_BYTES - len(head))
            except zlib.error as exc:
                raise CsvFileError(f"{path.name}: corrupt gzip stream: {exc}") from exc
            raw = decoder.unconsumed_tail or fh.read(SNIFF_BYTES)
        return head


def decode_bytes(raw: bytes, name: str, max_text_bytes: int | None = None) -> tuple[bytes | bytearray, str | None]:
    """The file's text (gunzipped if its magic bytes say gzip) and a problem if the gzip stream was truncated.

    A truncated stream keeps its complete lines, so the drift numbers can still be computed. Raises
    ``CsvFileError`` on a corrupt stream, bytes after the end of the stream, or text over the limit
    (``MAX_TEXT_BYTES`` unless given).
    """
    max_text_bytes = MAX_TEXT_BYTES if max_text_bytes is None else max_text_bytes
    if not is_gzip(raw):
        if len(raw) > max_text_bytes:
            raise CsvFileError(f"{name}: {len(raw)} bytes of text, more than the limit of {max_text_bytes} bytes")
        return raw, None
    # The gzip trailer's ISIZE (size mod 2**32 of the last member) sizes the buffer of the usual
    # single-member file, so the text is held once rather than as chunks plus their join.
    hint = int.from_bytes(raw[-4:], "little") if len(raw) >= 18 else 0
    out = bytearray(hint if 0 < hint <= max_text_bytes else 0)
    size, rest = 0, memoryview(raw)
    while True:
        decoder = zlib.decompressobj(wbits=31)
        pending = rest
        while pending and not decoder.eof:
            try:
                chunk = decoder.decompress(pending, INFLATE_CHUNK_BYTES)
            except zlib.error as exc:
                raise CsvFileError(f"{name}: corrupt gzip stream: {exc}") from exc
            if size + len(chunk) > max_text_bytes:
                raise CsvFileError(f"{name}: decompressed text exceeds the limit of {max_text_bytes} bytes "
                                   f"({len(raw)} compressed bytes; a gzip bomb or not one split)")
            if size + len(chunk) <= len(out):
                out[size:size + len(chunk)] = chunk
            else:
                del out[size:]
                out += chunk
            size += len(chunk)
            pending = decoder.unconsumed_tail
        if not decoder.eof:
            kept = bytes(out[: out.rfind(b"\n", 0, size) + 1])
            lines = kept.count(b"\n")
            return kept, (f"{name}: gzip stream truncated (no end-of-stream marker after {len(raw)} compressed "
                          f"bytes); checked the {lines} complete lines before the cut")
        rest = memoryview(decoder.unused_data)
        if not rest:
            del out[size:]
            return out, None
        if not is_gzip(bytes(rest[:2])):  # concatenated members are allowed; anything else is not
            offset = len(raw) - len(rest)
            raise CsvFileError(f"{name}: {len(rest)} bytes of trailing data after the gzip stream "
                               f"(at byte {offset}), starting {bytes(rest[:16])!r}")


class TextStream:
    """The decoded text of a split's bytes, streamed to pyarrow's reader thread with the rules of
    ``decode_bytes``: gzip by magic bytes, concatenated members, the size limit, an error on trailing data
    or a truncated stream. Trailing blank lines are withheld (they are harmless), so the whole text is
    never held in memory."""

    FEED_BYTES = 1 << 20

    def __init__(self, raw: bytes, name: str, max_text_bytes: int | None = None):
        self.raw, self.name = memoryview(raw), name
        self.max_text_bytes = MAX_TEXT_BYTES if max_text_bytes is None else max_text_bytes
        self.decoder = zlib.decompressobj(wbits=31) if is_gzip(raw[:2]) else None
        self.pos, self.tail, self.size, self.held, self.closed = 0, b"", 0, b"", False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def _feed(self) -> bytes:
        chunk = bytes(self.raw[self.pos:self.pos + self.FEED_BYTES])
        self.pos += len(chunk)
        return chunk

    def _next(self, n: int) -> bytes:
        """Up to ``n`` decoded bytes; b"" at the end of the text."""
        if self.decoder is None:
            return self._plain(n)
        while True:
            if self.decoder.eof:
                rest = self.decoder.unused_data + self._feed()
                if not rest:
                    return b""
                if not is_gzip(rest[:2]):
                    offset = self.pos - len(rest)
                    raise CsvFileError(f"{self.name}: {len(self.raw) - offset} bytes of trailing data after the gzip "
                                       f"stream (at byte {offset}), starting {bytes(rest[:16])!r}")
                self.decoder, self.tail = zlib.decompressobj(wbits=31), rest
            source = self.decoder.unconsumed_tail or self.tail or self._feed()
            self.tail = b""
            if not source:
                raise CsvFileError(f"{self.name}: gzip stream truncated (no end-of-stream marker after "
                                   f"{len(self.raw)} compressed bytes)")
            try:
                chunk = self.decoder.decompress(source, n)
            except zlib.error as exc:
                raise CsvFileError(f"{self.name}: corrupt gzip stream: {exc}") from exc
            if chunk:
                return chunk

    def _plain(self, n: int) -> bytes:
        chunk = bytes(self.raw[self.pos:self.pos + n])
        self.pos += len(chunk)
        return chunk

    def read(self, n: int = -1) -> bytes:
        n = n if n is not None and n > 0 else INFLATE_CHUNK_BYTES
        while True:
            chunk = self._next(n)
            self.size += len(chunk)
            if self.size > self.max_text_bytes:
                raise CsvFileError(f"{self.name}: decompressed text exceeds the limit of {self.max_text_bytes} "
                                   f"bytes ({len(self.raw)} compressed bytes; a gzip bomb or not one split)")
            if not chunk:
                return b""
            data = self.held + chunk
            stripped = data.rstrip(b"\r\n\t ")
            self.held = data[len(stripped):]
            if stripped:
                return stripped


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


def read_bytes(path: Path, expected_sha256: str | None = None, max_text_bytes: int | None = None) -> bytes:
    """The file's bytes, checked against ``expected_sha256`` when given (the bytes that are then parsed)."""
    limit = MAX_TEXT_BYTES if max_text_bytes is None else max_text_bytes
    size = Path(path).stat().st_size
    if size > limit:
        raise CsvFileError(f"{Path(path).name}: {size} bytes, more than the limit of {limit} bytes")
    raw = Path(path).read_bytes()
    if expected_sha256 is not None:
        found = hashlib.sha256(raw).hexdigest()
        if found != expected_sha256:
            raise CsvFileError(f"{Path(path).name}: SHA-256 {found}, expected {expected_sha256}: "
                               "the file changed since it was downloaded and verified")
    return raw


def read_text(path: Path, max_text_bytes: int | None = None) -> tuple[bytes | bytearray, str | None]:
    """``decode_bytes`` of a file."""
    return decode_bytes(read_bytes(path, max_text_bytes=max_text_bytes), Path(path).name, max_text_bytes)


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
