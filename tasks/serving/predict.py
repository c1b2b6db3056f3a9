"""Use the production model: ``train-mnist predict --dataset mnist rows.csv`` and ``load_production_model``.

The CSV is checked by the validation stage's own split checks (``tasks.validation.validate.validate_split``:
layout, parse, empty or non-integer cells, pixel range, labels in the classes) before anything is
scored, so rows a training run would refuse are refused here with the same messages (file, line,
column). It may be in the training layout (``label,pixel1..pixel784``, with or without its header; the
label is ignored for scoring), or hold the 784 pixel columns only: then with a header naming them
(``pixel1..pixel784``), or, without one, only when ``--pixels-only`` says so. A headerless file of 784
fields is otherwise refused: it could as well be the training layout with a column lost, and reading it as
pixels would shift every pixel by one. The output CSV has one line per input row: its line number, the
predicted class index and name, and one probability per class.

``load_production_model`` is the one place that finds and loads a dataset's production model, from either
registry (``tasks.registry``: a folder, or an MLflow server given as ``http(s)://host:port``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import storage
from tasks.datasets import (
    COLUMNS,
    LABEL_COLUMN,
    NUM_PIXELS,
    PIXEL_COLUMNS,
    DatasetConfigError,
    DatasetSpec,
    load_catalog,
    select_datasets,
)
from tasks.model_io import score
from tasks.registry import ChampionUnreadable, open_registry
from tasks.settings import Settings
from tasks.validation.csvfile import read_head, read_split_table, read_text, sniff_columns
from tasks.validation.expectations import GxRunner
from tasks.validation.validate import DataValidationError, validate_split


class NoProductionModel(LookupError):
    """The registry has no production model for the dataset."""


class ProductionModelUnreadable(RuntimeError):
    """The registry's production model (or its pointer, or the registry itself) cannot be read."""


class AmbiguousLayout(ValueError):
    """A headerless file of 784 fields: pixels only, or the training layout with a column lost."""


@dataclass(frozen=True)
class ProductionModel:
    dataset: str
    version: str
    path: str  # the model file, or its MLflow model URI
    model: object  # a keras.Model: (N, 784) raw 0..255 pixels -> (N, classes) probabilities


def load_production_model(dataset: str, registry: str | Path | None = None) -> ProductionModel:
    """The loaded production model of ``dataset`` (Keras safe mode), with its version and where it came from."""
    found = open_registry(registry if registry is not None else Settings().registry_location)
    try:
        version = found.production(dataset)
        if not version:
            raise NoProductionModel(f"{dataset}: no production model in {found.location}; publish one with "
                                    f"`train-mnist --dataset {dataset}` first")
        where, model = found.load_version(dataset, version)
    except (NoProductionModel, ChampionUnreadable):
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable server, missing or damaged file: one line for the user
        raise ProductionModelUnreadable(f"{dataset}: the production model in {found.location} cannot be read: "
                                        f"{type(exc).__name__}: {exc}") from None
    return ProductionModel(dataset, version, where, model)


def read_scoring_rows(spec: DatasetSpec, csv_path: Path, pixels_only: bool = False) -> np.ndarray:
    """Pixels (N, 784) uint8 of a CSV that passes the training data's row checks; raises naming each problem."""
    with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
        path = _with_label_column(csv_path, Path(tmp), pixels_only)
        free = spec.model_copy(update={"header": None, "test": spec.test.model_copy(update={"rows": None,
                                                                                           "sha256": None})})
        failures: list[str] = []
        validate_split(free, "test", path, GxRunner(), failures)
        if failures:
            raise DataValidationError(f"{csv_path}: not scored, {len(failures)} problem(s):\n- " + "\n- ".join(
                f.replace(path.name, csv_path.name) for f in failures))
        # Validated: the one reader that conversion uses gives the same matrix.
        columns, has_header = sniff_columns(read_head(path), csv_path.name, None)
        table = read_split_table(path, columns, has_header)
    return np.column_stack([column.to_numpy() for column in table.columns[1:]]).astype(np.uint8, copy=False)


def _with_label_column(csv_path: Path, tmp: Path, pixels_only: bool = False) -> Path:
    """``csv_path`` itself unless it holds pixels only (a header naming the pixel columns, or ``pixels_only``):
    then a copy with a label column of 0s. A headerless file of 784 fields without ``pixels_only`` is refused."""
    data, _ = read_text(csv_path) if csv_path.is_file() else (b"", None)
    first = data.split(b"\n", 1)[0].strip(b"\r\n ")
    fields = [f.strip(b'" ').decode(errors="replace") for f in first.split(b",")] if first else []
    header = bool(fields) and not fields[0].replace(".", "").isdigit()
    if pixels_only and (header or len(fields) != NUM_PIXELS):
        raise AmbiguousLayout(f"{csv_path}: --pixels-only, but its first line has {len(fields)} fields"
                              f"{' and is a header' if header else ''}; expected {NUM_PIXELS} pixel values per row "
                              "and no header")
    if not header and not pixels_only and len(fields) == NUM_PIXELS:
        raise AmbiguousLayout(
            f"{csv_path}: rows of {NUM_PIXELS} fields and no header: pixels only, or the training layout "
            f"({LABEL_COLUMN} + {NUM_PIXELS} pixels) with a column lost? Not scored. Add a header naming "
            f"{PIXEL_COLUMNS[0]}..{PIXEL_COLUMNS[-1]}, or pass --pixels-only if the rows hold pixels only")
    if not (pixels_only or header and tuple(fields) == PIXEL_COLUMNS):
        return csv_path  # the training layout; validation names whatever else is wrong with it
    lines = data.splitlines(keepends=True)
    prefixed = [(f"{LABEL_COLUMN}," if header and i == 0 else "0,").encode() + line if line.strip() else line
                for i, line in enumerate(lines)]
    dest = tmp / (csv_path.name.removesuffix(".gz"))
    dest.write_bytes(b"".join(prefixed))
    return dest


def predict_csv(csv_path: Path, dataset: str, output: Path, registry: Path | None = None,
                datasets_file: Path | None = None, pixels_only: bool = False) -> tuple[ProductionModel, int]:
    """Validate ``csv_path``, score it with the production model and write ``output``; (model, rows)."""
    [spec] = select_datasets(load_catalog(datasets_file), [dataset])
    pixels = read_scoring_rows(spec, csv_path, pixels_only)
    production = load_production_model(spec.name, registry)
    probabilities = score(production.model, pixels)
    if probabilities.shape != (len(pixels), spec.num_classes):
        raise ValueError(f"{production.path} returned {probabilities.shape} for {len(pixels)} rows, expected "
                         f"({len(pixels)}, {spec.num_classes}): not a model of {spec.name}'s classes")
    write_predictions(output, probabilities, list(spec.class_names))
    return production, len(pixels)


def write_predictions(dest: Path, probabilities: np.ndarray, class_names: list[str]) -> Path:
    """``row,predicted,predicted_name,p_0..p_k`` (row: 1-based data row), written under a temporary name."""
    with storage.atomic_path(dest) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "predicted", "predicted_name", *(f"p_{i}" for i in range(len(class_names)))])
        for row, probs in enumerate(probabilities, start=1):
            best = int(probs.argmax())
            writer.writerow([row, best, class_names[best], *(f"{p:.6f}" for p in probs)])
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train-mnist predict",
                                     description="Score a CSV of 28x28 images with a dataset's production model.")
    parser.add_argument("csv", type=Path, help=f"rows to score: {LABEL_COLUMN},pixel1..pixel{NUM_PIXELS} as in the "
                        f"training data, or the {len(COLUMNS) - 1} pixel columns only under a header naming them "
                        "(.csv or .csv.gz)")
    parser.add_argument("--pixels-only", action="store_true",
                        help=f"the file has no header and each row holds the {NUM_PIXELS} pixel values only")
    parser.add_argument("--dataset", required=True, help="whose production model to use (mnist, fashion-mnist, ...)")
    parser.add_argument("--output", "-o", type=Path, help="predictions CSV (default: <csv>.predictions.csv)")
    parser.add_argument("--registry", help="model registry: a folder or an MLflow URL (default <data-dir>/registry; "
                        "env TRAIN_MNIST_REGISTRY)")
    parser.add_argument("--datasets-file", type=Path, help="TOML file with more dataset definitions")
    args = parser.parse_args(argv)
    output = args.output or args.csv.with_name(args.csv.name.removesuffix(".gz").removesuffix(".csv")
                                                + ".predictions.csv")
    try:
        production, rows = predict_csv(args.csv, args.dataset, output, args.registry, args.datasets_file,
                                       args.pixels_only)
    except (DataValidationError, NoProductionModel, ProductionModelUnreadable, ChampionUnreadable, DatasetConfigError,
            ValueError, OSError) as exc:
        print(f"train-mnist predict: {exc}", file=sys.stderr)
        return 1
    print(f"scored {rows} rows with {production.dataset} {production.version} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
