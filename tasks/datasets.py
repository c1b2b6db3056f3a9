"""What a dataset is: files, checksums, CSV layout, class names, reference statistics, gates.

Built-in datasets live in ``datasets.toml`` beside this module; users describe their own MNIST-like
datasets in a file of the same format, passed with ``--datasets-file``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.download.locations import LocationError, check_dataset_path
from tasks.training.recipes import Recipe

IMAGE_SIDE = 28
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
# A flow's ``dataset`` parameter: "all", one name, or names separated by commas.
DATASET_NAMES = r"^\s*[a-z0-9][a-z0-9_-]*\s*(,\s*[a-z0-9][a-z0-9_-]*\s*)*$"
PIXEL_MIN, PIXEL_MAX = 0, 255
LABEL_COLUMN = "label"
PIXEL_COLUMNS = tuple(f"pixel{i}" for i in range(1, NUM_PIXELS + 1))
COLUMNS = (LABEL_COLUMN, *PIXEL_COLUMNS)
SPLITS: tuple[Literal["train", "test"], ...] = ("train", "test")
Split = Literal["train", "test"]

BUILTIN_DATASETS_FILE = Path(__file__).with_name("datasets.toml")


class DatasetConfigError(ValueError):
    """A dataset definition is malformed or unknown."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFile(_Strict):
    """One split's file: where it is (relative to the source and inside it, or an http(s) URL) and what it must be."""

    path: str = Field(min_length=1)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    rows: int | None = Field(default=None, gt=0)


class Gates(_Strict):
    """Accuracy gates a model must pass before it is published."""

    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_class_recall: float = Field(default=0.0, ge=0.0, le=1.0)


class ImageProfile(_Strict):
    """Statistics of a split that see the images' geometry: the per-pixel mean image."""

    rows: int = Field(gt=0)
    pixel_std: float = Field(ge=0, le=PIXEL_MAX)
    mean_image: tuple[float, ...] = Field(min_length=NUM_PIXELS, max_length=NUM_PIXELS)


class Reference(_Strict):
    """Reference statistics that a split's distribution is compared with."""

    class_counts: tuple[float, ...] = Field(min_length=2)
    pixel_mean: float = Field(ge=PIXEL_MIN, le=PIXEL_MAX)
    pixel_std: float = Field(gt=0, le=PIXEL_MAX)
    # In a datasets file: ``profile = "file.json"`` beside it (written like a version's data_profile.json split).
    profile: ImageProfile | None = None

    @property
    def class_proportions(self) -> list[float]:
        total = sum(self.class_counts)
        return [c / total for c in self.class_counts]


class Tolerances(_Strict):
    """How far a split may drift from the reference before validation fails."""

    max_label_kl: float = Field(default=0.05, gt=0)
    min_class_share_ratio: float = Field(default=0.5, ge=0, le=1)
    pixel_mean_rel_tol: float = Field(default=0.10, gt=0)
    pixel_std_rel_tol: float = Field(default=0.10, gt=0)
    max_blank_share: float = Field(default=0.01, ge=0, le=1)
    max_duplicate_share: float = Field(default=0.01, ge=0, le=1)
    max_test_in_train_share: float = Field(default=0.01, ge=0, le=1)
    # Root-mean-square difference of two mean images, in grey levels, beyond sampling noise (see validate.py).
    max_mean_image_rmse: float = Field(default=6.0, gt=0)


class DatasetSpec(_Strict):
    """A dataset of 28x28 grey-scale images stored as CSV rows ``label,p1..p784``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    train: SplitFile
    test: SplitFile
    header: bool | None = None  # None: detect from the first line
    class_names: tuple[str, ...] = Field(min_length=2)
    gates: Gates
    reference: Reference | None = None
    tolerances: Tolerances = Tolerances()
    recipe: Recipe = Recipe()

    @model_validator(mode="after")
    def _paths_stay_inside_the_source(self) -> DatasetSpec:
        for entry in (self.train, self.test):
            check_dataset_path(self.name, entry.path)
        return self

    @model_validator(mode="after")
    def _reference_matches_classes(self) -> DatasetSpec:
        if self.reference and len(self.reference.class_counts) != len(self.class_names):
            raise ValueError(
                f"reference.class_counts has {len(self.reference.class_counts)} entries "
                f"but there are {len(self.class_names)} class_names"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: Split) -> SplitFile:
        return self.train if split == "train" else self.test


def with_gate_overrides(spec: DatasetSpec, min_accuracy: float | None, min_class_recall: float | None) -> DatasetSpec:
    """``spec`` with a run's gate overrides applied (None: the dataset's own gate)."""
    changes = {k: v for k, v in (("min_accuracy", min_accuracy), ("min_class_recall", min_class_recall)) if v is not None}
    return spec.model_copy(update={"gates": Gates(**{**spec.gates.model_dump(), **changes})}) if changes else spec


def load_datasets_file(path: Path) -> dict[str, DatasetSpec]:
    """Read a TOML file of ``[[dataset]]`` tables into specs keyed by name."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DatasetConfigError(f"cannot read datasets file {path}: {exc}") from exc
    entries = raw.get("dataset")
    if not isinstance(entries, list) or not entries:
        raise DatasetConfigError(f"{path}: expected one or more [[dataset]] tables")
    specs: dict[str, DatasetSpec] = {}
    for i, entry in enumerate(entries, start=1):
        name = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        try:
            spec = DatasetSpec.model_validate(_with_profile(entry, Path(path).parent, name))
        except (ValidationError, LocationError) as exc:
            raise DatasetConfigError(f"{path}: dataset {name}: {exc}") from exc
        if spec.name in specs:
            raise DatasetConfigError(f"{path}: dataset {spec.name!r} is defined twice")
        specs[spec.name] = spec
    return specs


def _with_profile(entry: Any, folder: Path, name: str) -> Any:
    """Replace ``reference.profile = "file.json"`` by the profile it names (a file beside the datasets file)."""
    reference = entry.get("reference") if isinstance(entry, dict) else None
    if not isinstance(reference, dict) or not isinstance(reference.get("profile"), str):
        return entry
    relative = reference["profile"]
    check_dataset_path(name, relative)
    target = (folder / relative).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise LocationError(f"dataset {name}: profile {relative!r} leaves the folder of its datasets file")
    try:
        profile = json.loads(target.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetConfigError(f"dataset {name}: cannot read reference profile {target}: {exc}") from exc
    return {**entry, "reference": {**reference, "profile": profile}}


def load_catalog(datasets_file: Path | None = None) -> dict[str, DatasetSpec]:
    """Built-in datasets, plus (and overridden by) those of ``datasets_file``."""
    catalog = load_datasets_file(BUILTIN_DATASETS_FILE)
    if datasets_file is not None:
        catalog.update(load_datasets_file(datasets_file))
    return catalog


def select_datasets(catalog: dict[str, DatasetSpec], requested: list[str]) -> list[DatasetSpec]:
    """Resolve requested names (``all`` = every dataset of the catalog) or fail naming the unknown ones."""
    if not requested or "all" in requested:
        return list(catalog.values())
    unknown = [name for name in requested if name not in catalog]
    if unknown:
        raise DatasetConfigError(f"unknown dataset(s) {unknown}; known: {sorted(catalog)} or 'all'")
    return [catalog[name] for name in dict.fromkeys(requested)]
