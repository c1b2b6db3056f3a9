"""Benchmarks of the data stages: conversion against gunzip and pandas, Parquet sizes, validation per split,
the warm (cached) data stages of the flow, and candidate Parquet layouts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import Mode, interleaved_best, timed


def bench_conversion(work: Path, mode: Mode) -> dict[str, Any]:
    """convert_to_parquet on the full mnist train file, against only gunzipping it and against pandas."""
    import gzip

    import pandas as pd

    from tasks.conversion.convert import convert_to_parquet
    from tasks.conversion.parquet import COMPRESSION
    from tasks.datasets import load_catalog
    from tasks.settings import BUNDLED_MIRROR

    spec = load_catalog()["mnist"]
    src = BUNDLED_MIRROR / spec.train.path
    header = bool(spec.header)

    def ours() -> None:
        dest = work / "ours.parquet"
        dest.unlink(missing_ok=True)  # convert_to_parquet reuses an existing file
        convert_to_parquet(src, dest, header)

    def pandas() -> None:
        pd.read_csv(src, header=0 if header else None).to_parquet(work / "pandas.parquet", compression=COMPRESSION)

    def gunzip() -> None:  # the floor: read and decompress, nothing parsed or written (gzip is one stream)
        gzip.decompress(src.read_bytes())

    cpu: dict[str, float] = {}
    best = interleaved_best({"pyarrow": ours, "gunzip": gunzip, "pandas": pandas}, max(3, mode.repeats), cpu)
    return {"conversion_vs_gunzip_floor": best["pyarrow"] / best["gunzip"],
            "conversion_speedup_vs_pandas": best["pandas"] / best["pyarrow"],
            "details": {"file": spec.train.path, "pyarrow_s": best["pyarrow"], "pandas_s": best["pandas"],
                        "gunzip_s": best["gunzip"], "pyarrow_cpu_s": cpu["pyarrow"], "pandas_cpu_s": cpu["pandas"],
                        "gunzip_cpu_s": cpu["gunzip"], "cpu_speedup": cpu["pandas"] / cpu["pyarrow"],
                        "csv_bytes": len(gzip.decompress(src.read_bytes())), "gz_bytes": src.stat().st_size,
                        "repeats": max(3, mode.repeats)}}


def sized_parquet(work: Path, dataset: str, split: str) -> Path:
    """Where bench_sizes writes a split's Parquet file (the recipe fits train on them)."""
    return work / f"{dataset}-{split}.parquet"


def train_parquets(work: Path) -> dict[str, Path]:
    """Each built-in dataset's train split as Parquet (bench_sizes' files, converted here if it did not run)."""
    from tasks.conversion.convert import convert_to_parquet
    from tasks.datasets import load_catalog
    from tasks.settings import BUNDLED_MIRROR

    return {spec.name: convert_to_parquet(BUNDLED_MIRROR / spec.train.path, sized_parquet(work, spec.name, "train"),
                                          bool(spec.header)) for spec in load_catalog().values()}


def bench_sizes(work: Path) -> dict[str, Any]:
    """Parquet bytes over .csv.gz bytes for each built-in dataset (train + test), with the pipeline's writer."""
    from tasks.conversion.convert import convert_to_parquet
    from tasks.datasets import load_catalog
    from tasks.settings import BUNDLED_MIRROR

    per_dataset = {}
    for spec in load_catalog().values():
        gz = pq_bytes = 0
        for split in ("train", "test"):
            src = BUNDLED_MIRROR / spec.split(split).path
            dest = sized_parquet(work, spec.name, split)
            dest.unlink(missing_ok=True)
            convert_to_parquet(src, dest, bool(spec.header))
            gz, pq_bytes = gz + src.stat().st_size, pq_bytes + dest.stat().st_size
        per_dataset[spec.name] = {"csv_gz_bytes": gz, "parquet_bytes": pq_bytes, "ratio": pq_bytes / gz}
    return {"parquet_size_ratio": max(d["ratio"] for d in per_dataset.values()), "details": per_dataset}


def bench_validation(work: Path, mode: Mode) -> dict[str, Any]:
    """validate_dataset on the full mnist train + test files, normalised to seconds per 60,000 rows."""
    from tasks.datasets import load_catalog
    from tasks.settings import BUNDLED_MIRROR
    from tasks.validation.validate import validate_dataset

    spec = load_catalog()["mnist"]
    paths = [BUNDLED_MIRROR / spec.split(s).path for s in ("train", "test")]
    rows = spec.train.rows + spec.test.rows
    # The first call in a process also imports and sets up Great Expectations; recorded, not counted.
    first_call = timed(lambda: validate_dataset(spec, *paths, work / "validation-first"))[0]
    best = interleaved_best({"validate": lambda: validate_dataset(spec, *paths, work / "validation")}, mode.repeats)
    return {"validation_seconds_per_split": best["validate"] * 60_000 / rows,
            "details": {"seconds": best["validate"], "rows": rows, "repeats": mode.repeats,
                        "first_call_in_process_seconds": first_call}}


def bench_warm_data_stages(data_dir: Path) -> dict[str, Any]:
    """The flow's own data stages (``flows.train.prepare_data``: download -> validate -> convert) again on the
    cold run's data dir, where every stage should be served from its content cache."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.runtime import flow_run

    from flows.train import prepare_data
    from tasks import storage
    from tasks.datasets import load_catalog
    from tasks.settings import Settings

    settings = Settings(data_dir=data_dir)
    spec = load_catalog()["mnist"]

    @flow(name="bench-data-stages")
    def data_stages(run: str) -> dict[str, Any]:
        start = time.perf_counter()
        prepare_data(spec, settings, settings.runs_dir / run)
        return {"seconds": time.perf_counter() - start, "flow_run_id": flow_run.id}

    def task_states(flow_run_id) -> dict[str, str]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name: run.state_name for run in runs}

    # The first pass fills the cache for stages whose records the cold run did not leave; the second is measured,
    # with the in-process digest memo cleared so the raw files are hashed as in a new process.
    first = data_stages("bench-warm-1")
    storage.forget_digests()
    wall, warm = timed(lambda: data_stages("bench-warm-2"))
    return {"warm_data_stages_seconds": warm["seconds"],
            "details": {"states": task_states(warm["flow_run_id"]), "flow_call_seconds": wall,
                        "fill_pass": {"seconds": first["seconds"], "states": task_states(first["flow_run_id"])}}}


def bench_layouts(work: Path) -> dict[str, Any]:
    """Candidate Parquet layouts with an explicit uint8 schema: size vs .csv.gz, write and read-to-(N,784) times."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.conversion.convert import read_csv_table
    from tasks.conversion.parquet import load_xy
    from tasks.datasets import load_catalog
    from tasks.settings import BUNDLED_MIRROR

    def read_pixels_fsl(path: Path) -> np.ndarray:
        table = pq.read_table(path)
        return table.column("pixels").combine_chunks().values.to_numpy().reshape(table.num_rows, -1)

    def read_pixels_fsb(path: Path) -> np.ndarray:
        table = pq.read_table(path)
        column = table.column("pixels").combine_chunks()
        return np.frombuffer(column.buffers()[1], np.uint8).reshape(table.num_rows, -1)

    out: dict[str, Any] = {}
    for spec in load_catalog().values():
        src = BUNDLED_MIRROR / spec.train.path
        table = read_csv_table(src, bool(spec.header))
        labels = pa.array(table.column(0).to_numpy(), pa.uint8())
        pixels = np.ascontiguousarray(np.column_stack([c.to_numpy() for c in table.columns[1:]]))
        fsl = pa.table({"label": labels, "pixels": pa.FixedSizeListArray.from_arrays(
            pa.array(pixels.reshape(-1), pa.uint8()), pixels.shape[1])})
        fsb = pa.table({"label": labels, "pixels": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(pixels.shape[1]), len(pixels), [None, pa.py_buffer(pixels.tobytes())])})
        candidates = {
            "current: 785 uint8 columns, zstd(1)": (table, {"compression": "zstd"}, load_xy),
            "785 uint8 columns, zstd(9)": (table, {"compression": "zstd", "compression_level": 9}, load_xy),
            "label + FixedSizeList<uint8>[784], zstd(9), no dict": (
                fsl, {"compression": "zstd", "compression_level": 9, "use_dictionary": False}, read_pixels_fsl),
            "label + fixed_size_binary(784), zstd(9), no dict": (
                fsb, {"compression": "zstd", "compression_level": 9, "use_dictionary": False}, read_pixels_fsb),
        }
        rows = {}
        for name, (tbl, options, reader) in candidates.items():
            dest = work / "layout.parquet"
            write_s, _ = timed(lambda tbl=tbl, options=options, dest=dest: pq.write_table(tbl, dest, **options))
            read_s, _ = timed(lambda reader=reader, dest=dest: reader(dest))
            rows[name] = {"ratio": dest.stat().st_size / src.stat().st_size, "write_s": write_s, "read_s": read_s}
        out[spec.name] = rows
    return out
