"""The typed values that pass between stages: what each stage wrote and measured.

The flow hands these from one stage to the next; no stage rebuilds another's file names or reads its
results by key. Each is a frozen dataclass of paths and numbers (cheap to cache, easy to inspect) or a
pydantic model where it is also written to disk (``metrics.json``, the lineage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tasks import artifacts
from tasks.datasets import Split

# ---- download -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawFile:
    """A downloaded, verified file in the raw cache."""

    path: Path
    sha256: str
    size: int
    location: str  # where these bytes were fetched from (redacted)
    fetched: bool  # False when served from the cache
    fetched_at: str | None = None  # when they were fetched (UTC, ISO 8601); None if unknown
    requested: str | None = None  # the location this run asked for (redacted); differs when the cache answered
    split: Split | None = None  # which split of its dataset it is (set by ``download_split``)

    def lineage(self) -> dict[str, Any]:
        """What metrics.json and the model card record: where the bytes really came from, when, and how."""
        return {"location": self.location, "sha256": self.sha256, "bytes": self.size, "fetched_at": self.fetched_at,
                "served_from_cache": not self.fetched,
                **({"requested": self.requested} if self.requested and self.requested != self.location else {})}


# ---- validate -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitCheck:
    """What validation found about one split that later stages act on."""

    has_header: bool  # the layout as detected: conversion reads the file the same way
    rows: int


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of validating a dataset: where the report is, each split's layout and size, what drifted."""

    dataset: str
    passed: bool
    failures: list[str]
    drift: dict[str, Any]  # what validation.json's "drift" section holds
    report_path: Path
    train: SplitCheck
    test: SplitCheck
    docs_path: Path | None = None  # GX Data Docs index.html, if it could be built
    profile_path: Path | None = None  # data_profile.json: stored with the version if this run publishes
    html_path: Path | None = None  # validation.html: the report as one page that opens offline

    def split(self, split: Split) -> SplitCheck:
        return self.train if split == "train" else self.test

    def drift_numbers(self) -> dict[str, float]:
        return drift_numbers(self.drift)


def drift_numbers(drift: dict[str, Any]) -> dict[str, float]:
    """The scalar drift numbers of a validation's ``drift`` section, flattened (``test.label_kl``, ...)."""
    flat: dict[str, float] = {}
    for section, values in drift.items():
        if section == "reference_computed_from_train" or not isinstance(values, dict):
            continue
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{section}.{name}"] = float(value)
    return flat


@dataclass(frozen=True)
class PreparedData:
    """A dataset's data stages done: both raw files verified, validated, and converted to Parquet."""

    train_raw: RawFile
    test_raw: RawFile
    report: ValidationReport
    train_parquet: Path
    test_parquet: Path


# ---- train and evaluate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """What training wrote: the model, its per-epoch curves (JSON) and their plot."""

    model: Path
    curves_json: Path
    curves: Path

    @classmethod
    def in_folder(cls, out_dir: Path) -> TrainedModel:
        return cls(out_dir / artifacts.MODEL_FILE, out_dir / artifacts.CURVES_JSON, out_dir / artifacts.CURVES_PNG)


class ConfusedPair(BaseModel):
    true: str
    predicted: str
    count: int


class Metrics(BaseModel):
    """What ``metrics.json`` holds. Confusion matrix rows are true classes, columns predictions."""

    test_accuracy: float
    test_loss: float
    test_rows: int
    class_names: list[str]
    precision: dict[str, float]
    recall: dict[str, float]
    confusion_matrix: list[list[int]]
    most_confused: list[ConfusedPair]


def read_metrics(path: Path) -> Metrics:
    """A ``metrics.json`` written by an earlier run (benchmarks, tests); a run hands its own ``Evaluation`` on."""
    return Metrics.model_validate_json(Path(path).read_text())


@dataclass(frozen=True)
class Evaluation:
    """What evaluation measured, handed on in memory, and the files it wrote for people and later runs."""

    metrics: Metrics
    predictions: np.ndarray  # the predicted class of every test row
    probabilities: np.ndarray  # each test row's class probabilities (float32), as evaluation scored them
    metrics_path: Path
    predictions_path: Path
    probabilities_path: Path


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]  # one line per check, passed or failed


# ---- lineage --------------------------------------------------------------------------------------


class DataLineage(BaseModel):
    """Which bytes one split of a model was trained or tested on, and where they came from."""

    location: str
    sha256: str
    bytes: int
    fetched_at: str | None = None
    served_from_cache: bool = False
    requested: str | None = None  # only when the cache answered for another location
    rows: int | None = None

    def as_document(self) -> dict[str, Any]:
        return self.model_dump(exclude={"requested"} if self.requested is None else set())


class Lineage(BaseModel):
    """What a published version records about its making: data, parameters, the validation report."""

    data: dict[str, DataLineage] = {}
    parameters: dict[str, Any] = {}
    validation_report: str | None = None

    @classmethod
    def of_run(cls, raws: list[RawFile], report: ValidationReport, parameters: dict[str, Any]) -> Lineage:
        return cls(data={raw.split: DataLineage(**raw.lineage(), rows=report.split(raw.split).rows) for raw in raws},
                   parameters=parameters, validation_report=str(report.report_path))

    def as_document(self) -> dict[str, Any]:
        """The lineage as ``metrics.json`` holds it."""
        return {"data": {split: info.as_document() for split, info in self.data.items()},
                "parameters": self.parameters, "validation_report": self.validation_report}
