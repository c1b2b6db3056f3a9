"""One reader decides, for validation and conversion alike, what a file is and which values are legal. A file
that passes validation converts to exactly the matrix it holds; one that cannot convert fails validation
with the problem named."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.conversion.convert import convert_to_parquet
from tasks.datasets import COLUMNS, NUM_PIXELS, DatasetSpec, Gates, SplitFile, Tolerances
from tasks.validation import decoding
from tasks.validation.csvfile import CsvFileError, decode_bytes
from tasks.validation.validate import DataValidationError, validate_dataset

ROWS = {"train": 12, "test": 6}
LOOSE = Tolerances(max_label_kl=1e9, min_class_share_ratio=0.0, max_blank_share=1.0, max_duplicate_share=1.0,
                   max_test_in_train_share=1.0, max_mean_image_rmse=1e9)


def spec_for(train: str, test: str, header: bool | None = None) -> DatasetSpec:
    return DatasetSpec(name="variants", train=SplitFile(path=train), test=SplitFile(path=test), header=header,
                       class_names=tuple(str(i) for i in range(10)), gates=Gates(min_accuracy=0.5), tolerances=LOOSE)


def matrix(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([np.arange(rows) % 10, rng.integers(0, 256, (rows, NUM_PIXELS))]).astype(np.uint8)


def csv_text(m: np.ndarray, spell=str, header: bool = False, newline: str = "\n", bom: bool = False,
             trailing: str = "\n") -> bytes:
    lines = ([",".join(COLUMNS)] if header else []) + [",".join(spell(int(v)) for v in row) for row in m]
    return (b"\xef\xbb\xbf" if bom else b"") + (newline.join(lines) + trailing).encode()


def parquet_matrix(path: Path) -> np.ndarray:
    table = pq.read_table(path)
    return np.column_stack([c.to_numpy() for c in table.columns])


def validate_then_convert(tmp_path: Path, files: dict[str, tuple[str, bytes]], header: bool | None = None):
    """(passed validation?, {split: converted matrix}) - conversion runs only after validation passed."""
    for name, data in files.values():
        (tmp_path / name).write_bytes(data)
    spec = spec_for(files["train"][0], files["test"][0], header)
    try:
        report = validate_dataset(spec, tmp_path / files["train"][0], tmp_path / files["test"][0], tmp_path / "run")
    except DataValidationError as exc:
        return False, str(exc)
    out = {}
    for split, (name, _) in files.items():
        dest = tmp_path / f"{split}.parquet"
        dest.unlink(missing_ok=True)
        out[split] = parquet_matrix(convert_to_parquet(tmp_path / name, dest, report.split(split).has_header))
    return True, out


@pytest.mark.parametrize("spelling", ["121.0", "+217", "2.17e2"])
def test_number_spellings_conversion_refuses_fail_validation_naming_the_value(tmp_path, spelling):
    """Before: validation's float fallback accepted these, then conversion crashed on them."""
    m = matrix(ROWS["train"], 0)
    text = csv_text(m).replace(f",{m[3, 5]},".encode(), f",{spelling},".encode(), 1)
    passed, message = validate_then_convert(tmp_path, {"train": ("train.csv", text),
                                                       "test": ("test.csv", csv_text(matrix(ROWS["test"], 1)))})
    assert not passed
    assert repr(spelling) in message and "not a plain integer" in message


@pytest.mark.parametrize(("name", "compress"), [("train.csv", True), ("train.csv.gz", False)])
def test_the_file_kind_comes_from_its_bytes_not_its_name_in_both_stages(tmp_path, name, compress):
    """Before: gzip under a .csv name passed validation (magic bytes) and broke conversion (extension)."""
    m = matrix(ROWS["train"], 2)
    data = gzip.compress(csv_text(m)) if compress else csv_text(m)
    passed, out = validate_then_convert(tmp_path, {"train": (name, data),
                                                   "test": ("test.csv", csv_text(matrix(ROWS["test"], 3)))})
    assert passed, out
    assert np.array_equal(out["train"], m)


def test_trailing_garbage_after_the_gzip_stream_is_an_error_in_both_stages(tmp_path):
    """Before: validation silently dropped the bytes after the stream."""
    data = gzip.compress(csv_text(matrix(ROWS["train"], 4))) + b"GARBAGE"
    passed, message = validate_then_convert(tmp_path, {"train": ("train.csv.gz", data),
                                                       "test": ("test.csv", csv_text(matrix(ROWS["test"], 5)))})
    assert not passed and "trailing data after the gzip stream" in message
    with pytest.raises(CsvFileError, match="trailing data"):
        convert_to_parquet(tmp_path / "train.csv.gz", tmp_path / "t.parquet", False)


def test_a_gzip_bomb_fails_at_the_limit_naming_it(tmp_path, monkeypatch):
    bomb = gzip.compress(b"0," * NUM_PIXELS + b"0\n") * 1 + gzip.compress((b"0," * NUM_PIXELS + b"0\n") * 20000)
    assert len(bomb) < 100_000  # 31 MB of well-formed rows
    limit = 1 << 20
    with pytest.raises(CsvFileError, match=f"exceeds the limit of {limit} bytes"):
        decode_bytes(bomb, "bomb.csv.gz", max_text_bytes=limit)
    monkeypatch.setattr(decoding, "MAX_TEXT_BYTES", limit)
    passed, message = validate_then_convert(tmp_path, {"train": ("train.csv.gz", bomb),
                                                       "test": ("test.csv", csv_text(matrix(ROWS["test"], 6)))})
    assert not passed and f"exceeds the limit of {limit} bytes" in message
    with pytest.raises(CsvFileError, match=f"exceeds the limit of {limit} bytes"):
        convert_to_parquet(tmp_path / "train.csv.gz", tmp_path / "bomb.parquet", False)


def test_concatenated_gzip_members_are_one_stream(tmp_path):
    m = matrix(ROWS["train"], 7)
    text = csv_text(m)
    half = text.index(b"\n", len(text) // 2) + 1
    passed, out = validate_then_convert(tmp_path, {
        "train": ("train.csv.gz", gzip.compress(text[:half]) + gzip.compress(text[half:])),
        "test": ("test.csv", csv_text(matrix(ROWS["test"], 8)))})
    assert passed and np.array_equal(out["train"], m)


SPELLINGS = {
    "plain": str,
    "leading zeros": lambda v: f"{v:03d}",
    "decimal point": lambda v: f"{v}.0",
    "plus sign": lambda v: f"+{v}",
    "exponent": lambda v: f"{v / 100:.2f}e2",
    "space before": lambda v: f" {v}",
    "space after": lambda v: f"{v} ",
    "quoted": lambda v: f'"{v}"',
}


def _compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data)
    if how == "two members":
        return gzip.compress(data[: len(data) // 2]) + gzip.compress(data[len(data) // 2:])
    if how == "zlib (not gzip)":
        return zlib.compress(data)
    return data


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spelling=st.sampled_from(sorted(SPELLINGS)), spell_everywhere=st.booleans(),
       header=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(),
       trailing=st.sampled_from(["", "\n", "\n\n", "\r\n \n"]),
       compression=st.sampled_from(["none", "gzip", "two members", "zlib (not gzip)"]),
       gz_name=st.booleans(), seed=st.integers(0, 2**16))
def test_validate_then_convert_either_succeeds_with_the_same_matrix_or_fails_in_validation(
        tmp_path_factory, spelling, spell_everywhere, header, newline, bom, trailing, compression, gz_name, seed):
    tmp_path = tmp_path_factory.mktemp("variant")
    m = matrix(ROWS["train"], seed)
    odd = SPELLINGS[spelling]
    spell = odd if spell_everywhere else (lambda v, _n=[0]: odd(v) if (_n.__setitem__(0, _n[0] + 1) or
                                                                      _n[0] == 100) else str(v))
    text = csv_text(m, spell, header, newline, bom, trailing)
    name = "train.csv.gz" if gz_name else "train.csv"
    test_m = matrix(ROWS["test"], seed + 1)
    files = {"train": (name, _compress(text, compression)),
             "test": ("test.csv", csv_text(test_m, header=header))}
    passed, out = validate_then_convert(tmp_path, files)
    if passed:
        assert np.array_equal(out["train"], m), f"converted matrix differs for {spelling=} {compression=}"
        assert np.array_equal(out["test"], test_m)
    else:
        assert isinstance(out, str) and "variants" in out


def test_the_plain_variant_passes(tmp_path):
    """The property above is not vacuous: the ordinary file passes and converts exactly."""
    m, t = matrix(ROWS["train"], 11), matrix(ROWS["test"], 12)
    passed, out = validate_then_convert(tmp_path, {"train": ("train.csv.gz", gzip.compress(csv_text(m))),
                                                   "test": ("test.csv", csv_text(t))})
    assert passed and np.array_equal(out["train"], m) and np.array_equal(out["test"], t)
