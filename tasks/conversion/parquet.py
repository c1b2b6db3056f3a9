"""The Parquet layer: the typed layout of a split's file, its one writer and its one reader.

Conversion writes through ``write_split``; training, evaluation, publishing, the benchmarks and the
tests read through ``load_xy``, so the layout (``label`` then ``pixel1..pixel784``, all uint8) is
known in one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.datasets import COLUMNS

SCHEMA = pa.schema([pa.field(name, pa.uint8(), nullable=False) for name in COLUMNS])
COMPRESSION = "zstd"


def write_split(table: pa.Table, dest: Path) -> Path:
    """Write ``table`` (cast to ``SCHEMA``) as ``dest``, atomically; temporaries of killed writers are removed."""
    storage.remove_stale_temporaries(dest.parent, f".{dest.name}.")
    with storage.atomic_path(dest) as tmp:
        pq.write_table(table.cast(SCHEMA), tmp, compression=COMPRESSION)
    return dest


def load_xy(parquet_path: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 784) uint8 and labels (N,) int64 from a split's Parquet file."""
    table = pq.read_table(parquet_path)
    if limit is not None:
        table = table.slice(0, limit)
    columns = [column.to_numpy() for column in table.columns]
    labels = columns[0].astype(np.int64)
    pixels = np.column_stack(columns[1:]) if columns[1:] else np.empty((len(labels), 0), np.uint8)
    return pixels, labels
