"""Prediction sampling (``train-mnist serve --sample-rate F --sample-dir DIR``): a share of the served rows and
what the model answered, kept as Parquet files that a team can label and add to the next training set.

Each sampled row is one Parquet row: ``served_at`` (UTC), ``model``, ``version``, ``predicted`` (the class
index), ``confidence`` (its probability), then ``pixel1..pixel784`` (uint8, the splits' own pixel columns; add a
``label`` column in front and it has a split's layout). Rows are chosen at random, each with probability F.
They are buffered in memory (at most ``2 x rows_per_file``; beyond that, rows are dropped and counted) and
written by a background thread every ``flush_s`` seconds or when ``rows_per_file`` are waiting, each file
atomically (``samples-<UTC time>-<n>.parquet``); when the folder's files pass ``max_bytes`` together, the oldest
are deleted. Off by default: nothing is stored unless asked for.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import storage
from tasks.datasets import COLUMNS

logger = logging.getLogger("train_mnist.serving")
PIXEL_COLUMNS = COLUMNS[1:]
PREFIX = "samples-"
SCHEMA = pa.schema([pa.field("served_at", pa.timestamp("ms", tz="UTC")), pa.field("model", pa.string()),
                    pa.field("version", pa.string()), pa.field("predicted", pa.uint8()),
                    pa.field("confidence", pa.float32())] + [pa.field(name, pa.uint8()) for name in PIXEL_COLUMNS])


@dataclass
class PredictionSampler:
    folder: Path
    rate: float
    max_bytes: int = 256 * 2**20
    rows_per_file: int = 1000
    flush_s: float = 60.0
    seed: int | None = None
    sampled: int = 0
    dropped: int = 0
    files_written: int = 0
    _buffer: list[tuple[datetime, str, str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    _buffered_rows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _wake: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"--sample-rate must be above 0 and at most 1, not {self.rate}")
        if self.max_bytes <= 0:
            raise ValueError(f"the sample folder's size limit must be positive, not {self.max_bytes} bytes")
        self.folder.mkdir(parents=True, exist_ok=True)
        storage.remove_stale_temporaries(self.folder, f".{PREFIX}")
        self._rng = np.random.default_rng(self.seed)

    def observe(self, model: str, version: str, pixels: np.ndarray, probabilities: np.ndarray) -> None:
        """Keep each row with probability ``rate`` (called on the request path: a draw and a copy)."""
        with self._lock:
            chosen = np.flatnonzero(self._rng.random(len(pixels)) < self.rate)
            if not len(chosen):
                return
            room = 2 * self.rows_per_file - self._buffered_rows
            if room <= 0:
                self.dropped += len(chosen)
                return
            self.dropped += max(0, len(chosen) - room)
            chosen = chosen[:room]
            picked = probabilities[chosen]
            self._buffer.append((datetime.now(UTC), model, version, pixels[chosen].astype(np.uint8, copy=True),
                                 picked.argmax(axis=1).astype(np.uint8), picked.max(axis=1).astype(np.float32)))
            self._buffered_rows += len(chosen)
            self.sampled += len(chosen)
            if self._buffered_rows >= self.rows_per_file:
                self._wake.set()

    def flush(self) -> Path | None:
        """Write what is buffered as one file (atomically), then keep the folder under ``max_bytes``."""
        with self._lock:
            batches, self._buffer, self._buffered_rows = self._buffer, [], 0
        if not batches:
            return None
        columns = {
            "served_at": np.concatenate([np.full(len(b[3]), np.datetime64(b[0].replace(tzinfo=None), "ms"))
                                         for b in batches]),
            "model": [b[1] for b in batches for _ in range(len(b[3]))],
            "version": [b[2] for b in batches for _ in range(len(b[3]))],
            "predicted": np.concatenate([b[4] for b in batches]),
            "confidence": np.concatenate([b[5] for b in batches]),
        }
        pixels = np.concatenate([b[3] for b in batches])
        arrays = [pa.array(columns[name], type=SCHEMA.field(name).type) for name in list(columns)]
        arrays += [pa.array(pixels[:, i], type=pa.uint8()) for i in range(pixels.shape[1])]
        self.files_written += 1
        dest = self.folder / f"{PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{self.files_written}.parquet"
        with storage.atomic_path(dest) as tmp:
            pq.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA), tmp, compression="zstd")
        self.prune()
        return dest

    def prune(self) -> list[Path]:
        """Delete the oldest sample files until the folder's total is within ``max_bytes`` (the newest stays)."""
        files = sorted(self.folder.glob(f"{PREFIX}*.parquet"))
        total = sum(f.stat().st_size for f in files)
        removed = []
        while total > self.max_bytes and len(files) > 1:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            removed.append(oldest)
        return removed

    def run(self, stop: threading.Event) -> threading.Thread:
        """The writer thread: a file every ``flush_s`` seconds or when a file's rows are waiting; the rest at stop."""
        def loop() -> None:
            while not stop.is_set():
                self._wake.wait(self.flush_s)
                self._wake.clear()
                self._write_logged()
            self._write_logged()

        thread = threading.Thread(target=loop, name="train-mnist-sampling", daemon=True)
        thread.start()
        return thread

    def wake(self) -> None:
        """Have the writer thread look now (at stop: so it writes what is left and ends)."""
        self._wake.set()

    def _write_logged(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - a full disk must not take the server down; the rows are lost
            logger.warning("prediction samples not written to %s: %s: %s", self.folder, type(exc).__name__, exc)
