import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.conversion.convert import convert_to_parquet, parquet_path
from tasks.conversion.parquet import load_xy
from tasks.datasets import COLUMNS


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_slice_converts_to_typed_compressed_parquet_with_identical_values(name, catalog, slice_mirror, tmp_path):
    spec = catalog[name]
    csv_path = slice_mirror / spec.train.path
    dest = convert_to_parquet(csv_path, parquet_path(tmp_path, name, "train", "ab" * 32), has_header=bool(spec.header))

    table = pq.read_table(dest)
    assert table.schema.names == list(COLUMNS)
    assert all(t == pa.uint8() for t in table.schema.types)
    assert pq.ParquetFile(dest).metadata.row_group(0).column(0).compression == "ZSTD"
    with gzip.open(csv_path, "rt") as fh:
        lines = fh.read().splitlines()[1 if spec.header else 0:]
    expected = np.array([[int(v) for v in line.split(",")] for line in lines], dtype=np.uint8)
    pixels, labels = load_xy(dest)
    assert np.array_equal(labels, expected[:, 0]) and np.array_equal(pixels, expected[:, 1:])
    assert not list(dest.parent.glob(".*.tmp")), "temporary files left behind"


def test_parquet_path_is_content_addressed(tmp_path):
    a = parquet_path(tmp_path, "mnist", "train", "a" * 64)
    b = parquet_path(tmp_path, "mnist", "train", "b" * 64)
    assert a != b and a.parent == b.parent
