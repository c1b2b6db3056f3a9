"""Stage 3: convert a validated CSV split to a typed, compressed Parquet file with pyarrow."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import task

from tasks.caching import CONVERT_CACHE
from tasks.datasets import COLUMNS
from tasks.download import RawFile

SCHEMA = pa.schema([pa.field(name, pa.uint8(), nullable=False) for name in COLUMNS])
COMPRESSION = "zstd"


def parquet_path(parquet_dir: Path, dataset: str, split: str, source_sha256: str) -> Path:
    """Content-addressed: a changed source file gets a new Parquet file, never a stale one."""
    return parquet_dir / dataset / f"{split}-{source_sha256[:16]}.parquet"


def read_csv_table(csv_path: Path, has_header: bool) -> pa.Table:
    """Parse a (validated) CSV split straight into the uint8 schema, multi-threaded."""
    read = pacsv.ReadOptions(column_names=list(COLUMNS), skip_rows=1 if has_header else 0, block_size=1 << 24)
    convert = pacsv.ConvertOptions(column_types=dict(zip(SCHEMA.names, SCHEMA.types, strict=True)))
    return pacsv.read_csv(csv_path, read_options=read, convert_options=convert).cast(SCHEMA)


def convert_to_parquet(csv_path: Path, dest: Path, has_header: bool) -> Path:
    """Write ``csv_path`` as Parquet at ``dest`` (atomically); a ``dest`` that exists is reused."""
    if dest.is_file():
        return dest
    table = read_csv_table(csv_path, has_header)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression=COMPRESSION)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---- Prefect wrapper -----------------------------------------------------------------------------


# Cached by the raw file's sha256 + code version; a deleted Parquet file is written again.
@task(name="convert", task_run_name="convert-{dataset}-{split}", cache_policy=CONVERT_CACHE, persist_result=True)
def convert_task(raw: RawFile, has_header: bool, parquet_dir: Path, dataset: str, split: str) -> Path:
    from prefect import get_run_logger

    dest = parquet_path(parquet_dir, dataset, split, raw.sha256)
    existed = dest.is_file()
    path = convert_to_parquet(raw.path, dest, has_header)
    get_run_logger().info("%s %s (%d bytes)", "reused" if existed else "wrote", path, path.stat().st_size)
    return path
