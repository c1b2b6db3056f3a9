"""Small slices cut from the real datasets, and mirrors built from them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from tasks.datasets import DatasetSpec
from tasks.settings import BUNDLED_MIRROR
from tasks.storage import sha256_file

SLICE_ROWS = {"train": 3000, "test": 600}
TINY_TRAIN, TINY_ROWS = "mnist/mnist_train.csv.gz", 40  # the download tests' mirror (conftest's tiny_mirror)


def cut_slice(src: Path, dest: Path, rows: int, keep_header: bool, skip: int = 0) -> Path:
    """``rows`` data rows of a real .csv.gz file after its first ``skip`` (plus its header line, if it has one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt", newline="") as fin, gzip.open(dest, "wt", newline="") as fout:
        if keep_header:
            fout.write(fin.readline())
        for _ in zip(range(skip), fin, strict=False):
            pass
        for _, line in zip(range(rows), fin, strict=False):
            fout.write(line)
    return dest


def build_slice_mirror(root: Path, specs, rows: dict[str, int]) -> Path:
    """A mirror with the datasets' layout holding the first ``rows[split]`` rows of each real file."""
    for spec in specs:
        for split, n in rows.items():
            rel = spec.split(split).path
            cut_slice(BUNDLED_MIRROR / rel, root / rel, n, keep_header=bool(spec.header))
    return root


def slice_spec(spec: DatasetSpec, mirror: Path, rows: dict[str, int] = SLICE_ROWS) -> DatasetSpec:
    """``spec`` re-pinned to the slice files of ``mirror`` (row counts and checksums)."""
    splits = {
        split: spec.split(split).model_copy(update={"rows": n, "sha256": sha256_file(mirror / spec.split(split).path)})
        for split, n in rows.items()
    }
    return spec.model_copy(update=splits)


DIGITS = tuple(str(i) for i in range(10))


def mnist_like_datasets(*names: str, class_names: tuple[str, ...] = DIGITS, min_accuracy: float = 0.5,
                        test: str = "mnist/mnist_test.csv.gz") -> str:
    """A datasets file (TOML) defining each of ``names`` on the MNIST files of a (slice) mirror, with gates low
    enough for the small runs tests make."""
    return "".join(f"""
[[dataset]]
name = "{name}"
class_names = {json.dumps(list(class_names))}
train = {{ path = "mnist/mnist_train.csv.gz" }}
test = {{ path = "{test}" }}
gates = {{ min_accuracy = {min_accuracy}, min_class_recall = 0.0 }}
""" for name in names)


def slice_pixels(path: Path, rows: int | None = None) -> np.ndarray:
    """The pixels (N, 784) uint8 of a headerless .csv.gz slice, the first ``rows`` of them."""
    with gzip.open(path, "rt") as fin:
        lines = [line for _, line in zip(range(rows) if rows else iter(int, 1), fin, strict=False)]
    return np.array([[int(v) for v in line.split(",")[1:]] for line in lines], dtype=np.uint8)
