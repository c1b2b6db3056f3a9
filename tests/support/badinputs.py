"""Make each kind of bad input file from a real slice (a .csv.gz cut from the real data).

Every maker reads a real slice, breaks it the way files break in the wild, and writes the result to
``dest``; the rows it touches are fixed (``ROW``, ``PIXEL``) so tests can check that the error names them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

ROW = 17  # 0-based data row that row-level makers break
PIXEL = 300  # 1-based pixel column (``pixel300``) that cell-level makers break


def read_slice(src: Path) -> tuple[str | None, list[str]]:
    """The header line (or None) and the data lines of a slice, without line ends."""
    with gzip.open(src, "rt", newline="") as fh:
        lines = fh.read().splitlines()
    if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit():
        return lines[0], lines[1:]
    return None, lines


def line_of(src: Path, row: int) -> int:
    """1-based line number of data row ``row`` of a slice."""
    return row + 1 + (read_slice(src)[0] is not None)


def _out(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def write_csv_gz(dest: Path, header: str | None, rows: list[str]) -> Path:
    _out(dest)
    text = "".join(f"{line}\n" for line in ([header] if header is not None else []) + rows)
    dest.write_bytes(gzip.compress(text.encode()))
    return dest


def _edit_cells(src: Path, dest: Path, edit: Callable[[list[str]], None], row: int = ROW) -> Path:
    header, rows = read_slice(src)
    cells = rows[row].split(",")
    edit(cells)
    rows[row] = ",".join(cells)
    return write_csv_gz(dest, header, rows)


def _set_pixel(value: str) -> Callable[[Path, Path], Path]:
    def make(src: Path, dest: Path) -> Path:
        return _edit_cells(src, dest, lambda cells: cells.__setitem__(PIXEL, value))
    return make


def _set_label(value: str) -> Callable[[Path, Path], Path]:
    def make(src: Path, dest: Path) -> Path:
        return _edit_cells(src, dest, lambda cells: cells.__setitem__(0, value))
    return make


pixel_above_255 = _set_pixel("300")
pixel_below_0 = _set_pixel("-4")
pixel_float = _set_pixel("12.5")
pixel_non_numeric = _set_pixel("abc")
empty_cell = _set_pixel("")
label_outside_classes = _set_label("12")
label_missing = _set_label("")


def _map_columns(src: Path, dest: Path, change: Callable[[list[str]], list[str]]) -> Path:
    """Apply ``change`` to the header and to every row (the same column change everywhere)."""
    header, rows = read_slice(src)
    new_header = ",".join(change(header.split(","))) if header is not None else None
    return write_csv_gz(dest, new_header, [",".join(change(r.split(","))) for r in rows])


def missing_pixel_column(src: Path, dest: Path) -> Path:
    return _map_columns(src, dest, lambda cells: cells[:PIXEL] + cells[PIXEL + 1:])


def extra_column(src: Path, dest: Path) -> Path:
    """A trailing column ``source`` (value 0) on the header and every row."""
    header, rows = read_slice(src)
    return write_csv_gz(dest, f"{header},source" if header is not None else None, [f"{r},0" for r in rows])


def columns_swapped_in_header(src: Path, dest: Path) -> Path:
    """Header names pixel300 and pixel301 swapped (the data stays): only a header layout can show it."""
    header, rows = read_slice(src)
    if header is None:
        raise ValueError(f"{src} has no header row")
    names = header.split(",")
    names[PIXEL], names[PIXEL + 1] = names[PIXEL + 1], names[PIXEL]
    return write_csv_gz(dest, ",".join(names), rows)


def empty_file(src: Path, dest: Path) -> Path:
    _out(dest).write_bytes(b"")
    return dest


def header_only(src: Path, dest: Path) -> Path:
    header, _ = read_slice(src)
    if header is None:
        raise ValueError(f"{src} has no header row")
    return write_csv_gz(dest, header, [])


def truncated_mid_row(src: Path, dest: Path) -> Path:
    """A complete gzip stream whose text stops in the middle of its last row."""
    header, rows = read_slice(src)
    text = "".join(f"{line}\n" for line in ([header] if header else []) + rows)
    cut = text.rstrip("\n").rfind("\n") + 1 + len(rows[-1]) // 2
    _out(dest).write_bytes(gzip.compress(text[:cut].encode()))
    return dest


def truncated_gzip(src: Path, dest: Path) -> Path:
    """The first 60 % of the compressed bytes: a download cut off mid-stream."""
    raw = src.read_bytes()
    _out(dest).write_bytes(raw[: len(raw) * 6 // 10])
    return dest


def html_error_page(src: Path, dest: Path) -> Path:
    _out(dest).write_text("<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>\n"
                    "<body><h1>Service Unavailable</h1><p>Try again later.</p></body></html>\n")
    return dest


def json_document(src: Path, dest: Path) -> Path:
    _out(dest).write_text(json.dumps({"error": "rate limited", "retry_after": 60}) + "\n")
    return dest


def _relabel(src: Path, dest: Path, new_label: Callable[[int, str], str]) -> Path:
    header, rows = read_slice(src)
    out = []
    for i, row in enumerate(rows):
        label, rest = row.split(",", 1)
        out.append(f"{new_label(i, label)},{rest}")
    return write_csv_gz(dest, header, out)


def one_class_missing(src: Path, dest: Path, missing: str = "3") -> Path:
    """Every image of class ``missing`` relabelled as the next class: class 3 disappears."""
    return _relabel(src, dest, lambda i, label: str(int(missing) + 1) if label == missing else label)


def ninety_percent_one_class(src: Path, dest: Path, label: str = "1") -> Path:
    """Nine rows in ten relabelled to one class."""
    return _relabel(src, dest, lambda i, old: label if i % 10 else old)


def _map_pixels(src: Path, dest: Path, change: Callable[[int], str]) -> Path:
    header, rows = read_slice(src)
    out = []
    for row in rows:
        label, *pixels = row.split(",")
        out.append(",".join([label, *(change(int(p)) for p in pixels)]))
    return write_csv_gz(dest, header, out)


def inverted_images(src: Path, dest: Path) -> Path:
    return _map_pixels(src, dest, lambda p: str(255 - p))


def scaled_to_unit_floats(src: Path, dest: Path) -> Path:
    return _map_pixels(src, dest, lambda p: f"{p / 255:.6g}")


def blank_images(src: Path, dest: Path, every: int = 5) -> Path:
    """Every ``every``-th image all zeros (20 % blank by default)."""
    header, rows = read_slice(src)
    zeros = ",".join(["0"] * (len(rows[0].split(",")) - 1))
    out = [f"{r.split(',', 1)[0]},{zeros}" if i % every == 0 else r for i, r in enumerate(rows)]
    return write_csv_gz(dest, header, out)


def duplicate_rows(src: Path, dest: Path, every: int = 5) -> Path:
    """Every ``every``-th row replaced by a copy of the row before it (20 % exact duplicates)."""
    header, rows = read_slice(src)
    out = list(rows)
    for i in range(every, len(out), every):
        out[i] = out[i - 1]
    return write_csv_gz(dest, header, out)


def overlapping_test_split(train_src: Path, dest: Path, rows: int, header: bool) -> Path:
    """A "test" file made of the first ``rows`` train images: the splits overlap completely."""
    train_header, train_rows = read_slice(train_src)
    return write_csv_gz(dest, train_header if header else None, train_rows[:rows])


def copy(src: Path, dest: Path) -> Path:
    _out(dest).write_bytes(src.read_bytes())
    return dest
