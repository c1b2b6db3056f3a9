"""Profiles of a split that validation compares: label counts, pixel statistics, the mean image, and drift.

A profile is cheap to compute (one pass over the uint8 matrix) and small to store: the mean image is what
lets a change of geometry (every image mirrored, say) show up when global statistics stay the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import artifacts, storage
from tasks.datasets import (
    IMAGE_SIDE,
    LABEL_COLUMN,
    NUM_PIXELS,
    DatasetSpec,
    ImageProfile,
    Reference,
    Tolerances,
)

PROFILE_FILE = artifacts.PROFILE_FILE


NOISE_SIGMAS = 2.0  # sampling noise allowed on top of max_mean_image_rmse, in standard errors


STATS_CHUNK_ROWS = 8192  # bounds the temporaries of the sum-of-squares pass


@dataclass
class SplitProfile:
    """What validation measured on one split."""

    has_header: bool
    rows: pd.DataFrame  # one row per image: label, row_min, row_max, row_nulls, row_non_integer
    stats: dict[str, float]
    label_counts: list[int]
    row_hashes: set[int] = field(repr=False)
    mean_image: np.ndarray | None = field(default=None, repr=False)  # (784,) float64, per-pixel mean

    def image_profile(self) -> ImageProfile:
        return ImageProfile(rows=int(self.stats["rows"]), pixel_std=round(float(self.stats["pixel_std"]), 4),
                            mean_image=tuple(round(float(v), 3) for v in self.mean_image))


def profile_split(matrix: np.ndarray, num_classes: int, has_header: bool = False) -> SplitProfile:
    """Reduce an (N, 785) matrix to per-row checks and split statistics."""
    labels = matrix[:, 0].astype(np.float64)
    pixels = matrix[:, 1:]
    if pixels.dtype == np.uint8:
        nulls = np.zeros(len(pixels), dtype=np.int64)
        non_integer = nulls
        filled = pixels
    else:
        missing = np.isnan(pixels)
        nulls = missing.sum(axis=1)
        filled = np.where(missing, np.float32(0), pixels)
        non_integer = (filled != np.round(filled)).sum(axis=1)
    n = len(matrix)
    row_max = filled.max(axis=1).astype(np.float64) if n else np.zeros(0)
    rows = pd.DataFrame({
        LABEL_COLUMN: labels,
        "row_min": filled.min(axis=1).astype(np.float64) if n else np.zeros(0),
        "row_max": row_max,
        "row_nulls": nulls,
        "row_non_integer": non_integer,
    })
    valid_labels = labels[np.isfinite(labels) & (labels >= 0) & (labels < num_classes) & (labels == np.round(labels))]
    counts = np.bincount(valid_labels.astype(np.int64), minlength=num_classes)[:num_classes]
    unique = {hash(row.tobytes()) for row in filled}
    mean, std = pixel_mean_std(filled) if n else (math.nan, math.nan)
    mean_image = filled.sum(axis=0, dtype=np.float64) / n if n else None
    stats = {
        "rows": float(n),
        "pixel_mean": mean,
        "pixel_std": std,
        "blank_share": float((row_max == 0).mean()) if n else math.nan,
        "duplicate_share": 1.0 - len(unique) / n if n else math.nan,
    }
    return SplitProfile(has_header=has_header, rows=rows, stats=stats, label_counts=counts.tolist(), row_hashes=unique,
                        mean_image=mean_image)


def mean_image_distance(a: ImageProfile, b: ImageProfile) -> dict[str, float]:
    """Root-mean-square difference of two mean images (grey levels) and the sampling noise expected of it.

    ``noise`` is the standard error of the difference of two means of values with the profiles' pixel
    std, an upper bound for every pixel's; the check allows ``NOISE_SIGMAS`` of it on top of the tolerance.
    A mirrored, flipped or shifted dataset moves the mean image by 10-20 grey levels; the real test
    splits are 2.0 (MNIST) and 0.6 (Fashion-MNIST) from their train splits.
    """
    first, second = np.asarray(a.mean_image), np.asarray(b.mean_image)
    rmse = float(np.sqrt(np.mean((first - second) ** 2)))
    noise = math.sqrt(a.pixel_std ** 2 / a.rows + b.pixel_std ** 2 / b.rows)
    return {"mean_image_rmse": rmse, "noise": noise}


def image_drift(current: ImageProfile, reference: ImageProfile, tolerances: Tolerances) -> dict[str, float]:
    """The mean-image distance and the threshold it is checked against: the tolerance plus sampling noise."""
    distance = mean_image_distance(current, reference)
    distance["threshold"] = tolerances.max_mean_image_rmse + NOISE_SIGMAS * distance["noise"]
    return distance


def geometry_drift(spec: DatasetSpec, profiles: dict[str, SplitProfile | None],
                   champion: dict[str, ImageProfile] | None) -> dict[str, dict[str, float]]:
    """Mean-image distances of each split to the reference profile, to the champion's same split, and of
    test to train; each with the threshold it is checked against."""
    measured: dict[str, dict[str, float]] = {}
    current = {split: p.image_profile() for split, p in profiles.items() if p is not None and p.mean_image is not None}

    def add(name: str, a: ImageProfile, b: ImageProfile) -> None:
        measured[name] = image_drift(a, b, spec.tolerances)

    reference = spec.reference.profile if spec.reference is not None else None
    for split, profile in current.items():
        if reference is not None:
            add(f"{split}_vs_reference", profile, reference)
        if champion and split in champion:
            add(f"{split}_vs_champion", profile, champion[split])
    if "train" in current and "test" in current:
        add("test_vs_train", current["test"], current["train"])
    return measured


def read_profile(path: Path | None) -> dict[str, ImageProfile] | None:
    """A published version's ``data_profile.json`` (per split), or None when there is none."""
    if path is None:
        return None
    data = json.loads(Path(path).read_text())
    return {split: ImageProfile.model_validate(value) for split, value in data.get("splits", {}).items()}


def write_profile(report_dir: Path, spec: DatasetSpec, profiles: dict[str, SplitProfile | None]) -> Path | None:
    """This run's data profile (per split), which publishing stores with the version."""
    splits = {split: p.image_profile().model_dump(mode="json") for split, p in profiles.items()
              if p is not None and p.mean_image is not None}
    if len(splits) != len(profiles):
        return None
    return storage.write_json(report_dir / PROFILE_FILE, {"dataset": spec.name, "image_side": IMAGE_SIDE,
                                                   "pixels": NUM_PIXELS, "splits": splits})


def pixel_mean_std(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of all pixels, without a float64 copy of the matrix."""
    count = pixels.size
    if pixels.dtype == np.uint8:  # exact integer sums: sum of squares of 784 bytes fits uint32 per element
        total = int(pixels.sum(dtype=np.uint64))
        squares = 0
        for start in range(0, len(pixels), STATS_CHUNK_ROWS):
            chunk = pixels[start:start + STATS_CHUNK_ROWS].astype(np.uint32)
            np.multiply(chunk, chunk, out=chunk)
            squares += int(chunk.sum(dtype=np.uint64))
        return total / count, math.sqrt((squares * count - total * total) / (count * count))
    mean = float(pixels.sum(dtype=np.float64) / count)
    deviation = 0.0
    for start in range(0, len(pixels), STATS_CHUNK_ROWS):
        chunk = pixels[start:start + STATS_CHUNK_ROWS].astype(np.float64) - mean
        deviation += float(np.einsum("ij,ij->", chunk, chunk))
    return mean, math.sqrt(deviation / count)


def reference_from_profile(profile: SplitProfile) -> Reference:
    """Reference statistics computed from a (train) split, for datasets that pin none."""
    return Reference(
        class_counts=tuple(float(c) for c in profile.label_counts),
        pixel_mean=profile.stats["pixel_mean"],
        pixel_std=profile.stats["pixel_std"],
    )


def label_drift(counts: list[int], reference: Reference) -> dict[str, float]:
    """KL(observed || reference) of the label distribution and the smallest observed/reference class share."""
    total = sum(counts)
    if not total:
        return {"label_kl": math.inf, "min_class_share_ratio": 0.0}
    observed = [c / total for c in counts]
    expected = reference.class_proportions
    kl = sum(p * math.log(p / q) if q > 0 else math.inf
             for p, q in zip(observed, expected, strict=True) if p > 0)
    ratio = min(p / q for p, q in zip(observed, expected, strict=True) if q > 0)
    return {"label_kl": kl, "min_class_share_ratio": ratio}


def serving_drift(pixels: np.ndarray, predicted_counts: list[int], spec: DatasetSpec,
                  trained_on: ImageProfile) -> dict[str, dict[str, float]]:
    """Validation's drift statistics for rows a model server scored, against the profile of the rows the model
    was trained on: each statistic's ``value`` and the ``threshold`` it must stay at or under.

    The same definitions and tolerances as validation's checks: the relative shift of the pixel mean and of
    the pixel std (``pixel_mean_rel_tol``, ``pixel_std_rel_tol``), the mean-image distance with its noise
    allowance (``max_mean_image_rmse``), and the label KL divergence (``max_label_kl``), here of the predicted
    classes, since served rows come without labels, against the dataset's reference class balance."""
    tol = spec.tolerances
    mean, std = pixel_mean_std(pixels)
    trained_mean = float(np.mean(trained_on.mean_image))
    window = ImageProfile(rows=len(pixels), pixel_std=std,
                          mean_image=tuple(pixels.sum(axis=0, dtype=np.float64) / len(pixels)))
    image = image_drift(window, trained_on, tol)
    scores = {
        "pixel_mean_shift": {"value": abs(mean - trained_mean) / trained_mean, "threshold": tol.pixel_mean_rel_tol},
        "pixel_std_shift": {"value": abs(std - trained_on.pixel_std) / trained_on.pixel_std,
                            "threshold": tol.pixel_std_rel_tol},
        "mean_image_rmse": {"value": image["mean_image_rmse"], "threshold": image["threshold"]},
    }
    if spec.reference is not None:
        scores["predicted_class_kl"] = {"value": label_drift(predicted_counts, spec.reference)["label_kl"],
                                        "threshold": tol.max_label_kl}
    return scores
