"""Stage 2: validate a dataset's train and test CSVs with Great Expectations before anything trains.

Per-pixel expectations (784 columns x N rows) are slow in GX, so the rows are first reduced with
NumPy to a few derived columns (row min/max, nulls, non-integers) and a one-row table of split
statistics; GX validates those, and NumPy then points at the offending cells of the rows GX flags.
Every run writes its drift numbers and GX results (``validation.json``) and the GX Data Docs
(``data_docs/index.html``) to the report folder, passed or failed.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from tasks import artifacts, storage
from tasks.datasets import COLUMNS, DatasetSpec, ImageProfile, Split
from tasks.orchestration.caching import VALIDATE_CACHE
from tasks.results import SplitCheck, ValidationReport, drift_numbers
from tasks.validation import DataValidationError
from tasks.validation.csvfile import CsvFileError, decode_bytes, read_bytes, read_head, sniff_columns, stream_strict
from tasks.validation.expectations import (
    DOCS_DIRNAME,
    CellLocator,
    GxRunner,
    describe_failures,
    geometry_expectations,
    pair_expectations,
    rows_expectations,
    schema_expectations,
    stats_expectations,
)
from tasks.validation.lenient import MAX_EXAMPLES, ParsedSplit, read_matrix, schema_problems, table_to_matrix
from tasks.validation.profiling import (
    SplitProfile,
    geometry_drift,
    label_drift,
    profile_split,
    read_profile,
    reference_from_profile,
    write_profile,
)
from tasks.validation.report import write_validation_html

__all__ = ["DataValidationError", "ValidationReport", "report_in_run_dir", "validate_dataset", "validate_split",
           "validate_task"]


def _short(text: str) -> str:
    return text.strip().splitlines()[0][:300]


def validate_split(spec: DatasetSpec, split: Split, path: Path, gx_runner: GxRunner,
                   failures: list[str]) -> SplitProfile | None:
    """Schema, parse and row checks for one split; returns its profile, or None if it cannot be read."""
    name = f"{spec.name}-{split}"
    where = f"{name} ({path.name})"
    try:
        columns, has_header = sniff_columns(read_head(path), where, spec.header)
    except CsvFileError as exc:
        failures.append(str(exc))
        return None
    # An empty frame with the file's columns; one uint8 block, since GX fingerprints every column of a batch.
    header_frame = pd.DataFrame(np.zeros((0, len(columns)), np.uint8), columns=columns)
    schema = gx_runner.run(f"{name}-schema", header_frame, schema_expectations(list(COLUMNS)))
    if not schema.success:
        detail = schema_problems(columns, list(COLUMNS), has_header)
        failures.extend(describe_failures(f"{name}-schema", schema, found=detail))
        return None
    before = len(failures)
    strict_problem = None
    try:
        raw = read_bytes(path)
    except CsvFileError as exc:
        failures.append(f"{where}: {exc}")
        return None
    try:  # the one reader, as conversion will read the file
        parsed = ParsedSplit(table_to_matrix(stream_strict(raw, where, columns, has_header), np.uint8),
                             1 + int(has_header))
    except CsvFileError as exc:
        strict_problem = str(exc)  # named below, unless the careful read names the problem itself
        try:
            data, truncated = decode_bytes(raw, path.name)
        except CsvFileError as again:
            failures.append(str(again))
            return None
        if truncated:
            failures.append(f"{name}: {truncated}")
        try:
            parsed = read_matrix(data, where, columns, has_header)
        except DataValidationError as again:
            failures.append(str(again))
            return None
        del data
    del raw
    if parsed.bad_rows:
        examples = ", ".join(f"line {line} has {fields} fields" for line, fields, _ in parsed.bad_rows[:MAX_EXAMPLES])
        failures.append(f"{where}: {len(parsed.bad_rows)} row(s) with the wrong number of fields, expected "
                        f"{len(COLUMNS)} (truncated or malformed rows, skipped): {examples}")
    profile = profile_split(parsed.matrix, spec.num_classes, has_header)
    rows = gx_runner.run(f"{name}-rows", profile.rows, rows_expectations(spec, split))
    failures.extend(describe_failures(f"{name}-rows", rows, CellLocator(parsed, columns)))
    if strict_problem is not None and len(failures) == before:
        # The one reader refused the file: conversion would fail, so validation must too.
        failures.append(strict_problem)
    if not len(parsed.matrix):
        failures.append(f"{where}: no data rows" + (" after the header (header-only file)" if has_header else ""))
        return None
    return profile


def validate_dataset(spec: DatasetSpec, train_path: Path, test_path: Path, report_dir: Path,
                     champion_profile: dict[str, ImageProfile] | None = None) -> ValidationReport:
    """Validate both splits and their relation; write ``validation.json``, ``data_profile.json`` and Data Docs;
    raise if anything failed.

    ``champion_profile`` is the production version's data profile (``read_profile``), or None: each
    split's mean image is then also compared with the champion's, which covers datasets without a
    reference profile.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    runner = GxRunner()
    failures: list[str] = []
    profiles = {split: validate_split(spec, split, path, runner, failures)
                for split, path in (("train", train_path), ("test", test_path))}
    drift: dict[str, Any] = {}
    reference = spec.reference
    if reference is None and profiles["train"] is not None:
        try:
            reference = reference_from_profile(profiles["train"])
            drift["reference_computed_from_train"] = reference.model_dump(mode="json")
        except ValueError as exc:
            failures.append(f"{spec.name}-train: cannot compute reference statistics from train: {_short(str(exc))}")
    for split, profile in profiles.items():
        if profile is None:
            continue
        stats: dict[str, Any] = dict(profile.stats)
        if reference is not None:
            stats.update(label_drift(profile.label_counts, reference))
        drift[split] = {**stats, "label_counts": profile.label_counts}
        if reference is not None:
            result = runner.run(f"{spec.name}-{split}-stats", pd.DataFrame([stats]), stats_expectations(spec, reference))
            failures.extend(describe_failures(f"{spec.name}-{split}-stats", result))
    train, test = profiles["train"], profiles["test"]
    if train is not None and test is not None:
        n_test = test.stats["rows"]
        pair = {
            "test_in_train_share": len(test.row_hashes & train.row_hashes) / n_test if n_test else 0.0,
            "test_to_train_rows": n_test / train.stats["rows"] if train.stats["rows"] else math.inf,
        }
        drift["pair"] = pair
        result = runner.run(f"{spec.name}-pair", pd.DataFrame([pair]), pair_expectations(spec))
        failures.extend(describe_failures(f"{spec.name}-pair", result))
    geometry = geometry_drift(spec, profiles, champion_profile)
    drift["geometry"] = geometry
    if champion_profile is None:
        drift["geometry_champion"] = "no champion profile (first version, or one published before profiles)"
    if geometry:
        row = {name: d["mean_image_rmse"] for name, d in geometry.items()}
        result = runner.run(f"{spec.name}-geometry", pd.DataFrame([row]), geometry_expectations(geometry))
        failures.extend(describe_failures(f"{spec.name}-geometry", result))
    profile_path = write_profile(report_dir, spec, profiles)
    docs_path, docs_error = None, None
    try:
        docs_path = runner.build_docs(report_dir / DOCS_DIRNAME)
    except Exception as exc:  # noqa: BLE001 - the docs are a view; the verdict and validation.json must not depend on them
        docs_error = f"{type(exc).__name__}: {_short(str(exc))}"
    report_path, html_path = write_report(report_dir, spec, failures, drift, runner.results, docs_path, docs_error)
    if failures:
        raise DataValidationError(
            f"{spec.name}: data failed validation ({len(failures)} problem(s)):\n- " + "\n- ".join(failures),
            report_path, drift_numbers(drift))
    train_check, test_check = (SplitCheck(p.has_header, int(p.stats["rows"])) for p in (train, test))
    return ValidationReport(spec.name, True, [], drift, report_path, train_check, test_check, docs_path, profile_path,
                            html_path)


def write_report(report_dir: Path, spec: DatasetSpec, failures: list[str], drift: dict[str, Any],
                 results: list[Any], docs_path: Path | None = None,
                 docs_error: str | None = None) -> tuple[Path, Path]:
    """Write the run's validation report (drift numbers and GX results) and its offline HTML view, atomically."""
    report = {
        "dataset": spec.name,
        "passed": not failures,
        "failures": failures,
        "drift": drift,
        "data_docs": str(docs_path) if docs_path else None,
        **({"data_docs_error": docs_error} if docs_error else {}),
        "great_expectations": [r.to_json_dict() for r in results],
    }
    return storage.write_json(report_dir / artifacts.VALIDATION_JSON, report), write_validation_html(report, report_dir)


def report_in_run_dir(report: ValidationReport, run_dir: Path) -> ValidationReport:
    """The run's folder always holds its ``validation.json``.

    A validation served from cache points at the report of the run that validated these bytes (an earlier
    run's folder); it is copied into this run's folder with ``served_from_cache`` naming the original.
    """
    target = run_dir / artifacts.VALIDATION_JSON
    if report.report_path == target:
        return report
    data = json.loads(report.report_path.read_text())  # an earlier run's file: this run holds only its path
    data["served_from_cache"] = str(report.report_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    profile_path = report.profile_path
    if profile_path is not None and profile_path.is_file():
        profile_path = storage.write_json(run_dir / artifacts.PROFILE_FILE, json.loads(profile_path.read_text()))
    return replace(report, report_path=storage.write_json(target, data), profile_path=profile_path,
                   html_path=write_validation_html(data, run_dir))


@task(name="validate", task_run_name="validate-{spec.name}", cache_policy=VALIDATE_CACHE, persist_result=True)
def validate_task(spec: DatasetSpec, train_path: Path, test_path: Path, report_dir: Path,
                  champion_profile: Path | None = None) -> ValidationReport:
    from prefect import get_run_logger

    logger = get_run_logger()
    report = validate_dataset(spec, train_path, test_path, report_dir, read_profile(champion_profile))
    logger.info("%s passed validation; drift %s; report %s; data docs %s", spec.name,
                {s: {k: round(v, 4) for k, v in d.items() if isinstance(v, float)} for s, d in report.drift.items()
                 if s in ("train", "test")}, report.report_path, report.docs_path)
    return report


@task(name="keep-validation-report", task_run_name="keep-validation-report-{report.dataset}")
def keep_report_task(report: ValidationReport, run_dir: Path) -> ValidationReport:
    """``report_in_run_dir`` as a task: the run's folder holds its validation report, cached or not."""
    return report_in_run_dir(report, run_dir)


@task(name="champion-profile", task_run_name="champion-profile-{dataset}")
def champion_profile_task(registry: str, dataset: str, run_dir: Path) -> Path | None:
    """The production model's data profile (validation compares this run's mean images with it), or None."""
    from tasks.registry import open_registry

    return open_registry(registry).champion_profile(dataset, run_dir)
