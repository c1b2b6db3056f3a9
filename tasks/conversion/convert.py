"""Stage 3: convert a validated CSV split to a typed, compressed Parquet file with pyarrow."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from prefect import task

from tasks import storage
from tasks.conversion.parquet import SCHEMA, write_split
from tasks.datasets import COLUMNS
from tasks.orchestration.caching import CONVERT_CACHE
from tasks.results import RawFile
from tasks.validation.csvfile import read_split_table


def parquet_path(parquet_dir: Path, dataset: str, split: str, source_sha256: str) -> Path:
    """Content-addressed: a changed source file gets a new Parquet file, never a stale one."""
    return parquet_dir / dataset / f"{split}-{source_sha256[:16]}.parquet"


def read_csv_table(csv_path: Path, has_header: bool, expected_sha256: str | None = None) -> pa.Table:
    """Parse a (validated) CSV split into the uint8 schema with the reader validation uses (``tasks.validation.csvfile``)."""
    return read_split_table(csv_path, list(COLUMNS), has_header, expected_sha256).cast(SCHEMA)


def convert_to_parquet(csv_path: Path, dest: Path, has_header: bool, expected_sha256: str | None = None) -> Path:
    """Write ``csv_path`` as Parquet at ``dest`` (atomically) and record its SHA-256 beside it.

    ``expected_sha256`` is the raw file's checksum the output is named after: the bytes parsed are
    checked against it. A ``dest`` that exists is reused only if it holds the bytes recorded when it
    was written; otherwise it is written again.
    """
    if dest.is_file() and storage.recorded_sha256(dest) == storage.sha256_file(dest):
        return dest
    write_split(read_csv_table(csv_path, has_header, expected_sha256), dest)
    storage.record_sha256(dest)
    return dest


# ---- Prefect wrapper -----------------------------------------------------------------------------


# Cached by the raw file's sha256 + code version; a deleted or altered Parquet file is written again.
@task(name="convert", task_run_name="convert-{dataset}-{split}", cache_policy=CONVERT_CACHE, persist_result=True)
def convert_task(raw: RawFile, has_header: bool, parquet_dir: Path, dataset: str, split: str) -> Path:
    from prefect import get_run_logger

    dest = parquet_path(parquet_dir, dataset, split, raw.sha256)
    existed = dest.is_file()
    path = convert_to_parquet(raw.path, dest, has_header, raw.sha256)
    get_run_logger().info("%s %s (%d bytes)", "reused" if existed else "wrote", path, path.stat().st_size)
    return path
