"""A split file's bytes to text: gzip by magic bytes, concatenated members, a size limit, no trailing data.

A file is gzip when its first bytes are the gzip magic, whatever its name. Concatenated gzip members
form one stream; anything else after the stream is an error, and so is a text larger than
``MAX_TEXT_BYTES`` (a gzip bomb fails at the limit, having held at most the limit in memory).
``TextStream`` streams the text to pyarrow; ``decode_bytes`` holds it, to name a refused file's problems.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
SNIFF_BYTES = 64 * 1024
INFLATE_CHUNK_BYTES = 16 << 20
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
