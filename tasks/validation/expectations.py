"""The Great Expectations side of validation: suites over derived row and split statistics, how they run,
and how a failed expectation is told (with the offending cells located in the CSV).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks import artifacts
from tasks.datasets import (
    LABEL_COLUMN,
    PIXEL_MAX,
    PIXEL_MIN,
    DatasetSpec,
    Reference,
    Split,
)
from tasks.validation.lenient import MAX_EXAMPLES, ParsedSplit

DOCS_DIRNAME = artifacts.DATA_DOCS_DIR


DOCS_SITE = "train-mnist-run"


GX_LOGGERS = ("great_expectations", "great_expectations.data_context.types.base")


def expectation(kind: str, check: str, **kwargs: Any) -> Any:
    import great_expectations.expectations as gxe

    return getattr(gxe, kind)(meta={"check": check}, notes=check, **kwargs)


def schema_expectations(expected_columns: list[str]) -> list:
    return [expectation("ExpectTableColumnsToMatchOrderedList", "column layout differs from label, pixel1..pixel784",
                    column_list=expected_columns)]


def rows_expectations(spec: DatasetSpec, split: Split) -> list:
    expected_rows = spec.split(split).rows
    count = (expectation("ExpectTableRowCountToEqual", "row count differs from the pinned count", value=expected_rows)
             if expected_rows else
             expectation("ExpectTableRowCountToBeBetween", "no data rows", min_value=1))
    return [
        count,
        expectation("ExpectColumnValuesToNotBeNull", "label missing", column=LABEL_COLUMN),
        expectation("ExpectColumnValuesToBeInSet", f"label outside the classes 0..{spec.num_classes - 1}",
                column=LABEL_COLUMN, value_set=list(range(spec.num_classes))),
        expectation("ExpectColumnValuesToBeBetween", "empty pixel cells", column="row_nulls", max_value=0),
        expectation("ExpectColumnValuesToBeBetween", "non-integer pixel values", column="row_non_integer", max_value=0),
        expectation("ExpectColumnValuesToBeBetween", f"pixel value below {PIXEL_MIN}", column="row_min",
                min_value=PIXEL_MIN),
        expectation("ExpectColumnValuesToBeBetween", f"pixel value above {PIXEL_MAX}", column="row_max",
                max_value=PIXEL_MAX),
    ]


def stats_expectations(spec: DatasetSpec, reference: Reference) -> list:
    tol = spec.tolerances
    mean, std = reference.pixel_mean, reference.pixel_std
    return [
        expectation("ExpectColumnValuesToBeBetween", "pixel mean drifted from the reference", column="pixel_mean",
                min_value=mean * (1 - tol.pixel_mean_rel_tol), max_value=mean * (1 + tol.pixel_mean_rel_tol)),
        expectation("ExpectColumnValuesToBeBetween", "pixel std drifted from the reference", column="pixel_std",
                min_value=std * (1 - tol.pixel_std_rel_tol), max_value=std * (1 + tol.pixel_std_rel_tol)),
        expectation("ExpectColumnValuesToBeBetween", "class balance drifted (label KL divergence from the reference)",
                column="label_kl", max_value=tol.max_label_kl),
        expectation("ExpectColumnValuesToBeBetween", "a class is under-represented (smallest observed/reference share)",
                column="min_class_share_ratio", min_value=tol.min_class_share_ratio),
        expectation("ExpectColumnValuesToBeBetween", "too many blank (all-zero) images", column="blank_share",
                max_value=tol.max_blank_share),
        expectation("ExpectColumnValuesToBeBetween", "too many exact duplicate images", column="duplicate_share",
                max_value=tol.max_duplicate_share),
    ]


def pair_expectations(spec: DatasetSpec) -> list:
    return [
        expectation("ExpectColumnValuesToBeBetween", "test split overlaps the train split (test images found in train)",
                column="test_in_train_share", max_value=spec.tolerances.max_test_in_train_share),
        expectation("ExpectColumnValuesToBeBetween", "test split has more rows than train (splits swapped?)",
                column="test_to_train_rows", max_value=1.0),
    ]


def geometry_expectations(geometry: dict[str, dict[str, float]]) -> list:
    return [expectation("ExpectColumnValuesToBeBetween",
                    f"mean image moved ({name.replace('_', ' ')}: mirrored, flipped, shifted or other images?)",
                    column=name, max_value=round(d["threshold"], 4)) for name, d in geometry.items()]


def quiet_gx_logging() -> None:
    """GX logs progress and config chatter at INFO/WARNING; keep only its errors."""
    for name in GX_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class GxRunner:
    """One ephemeral GX context for a validation run; each ``run`` validates a DataFrame against a suite."""

    def __init__(self) -> None:
        quiet_gx_logging()
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        quiet_gx_logging()
        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._source = self.context.data_sources.add_pandas("train-mnist")
        self.results: list[Any] = []

    def run(self, name: str, frame: pd.DataFrame, expectations: list) -> Any:
        gx = self._gx
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        # The result is also kept in the context's validation results store, from which the docs are built.
        result = definition.run(batch_parameters={"dataframe": frame},
                                result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES})
        self.results.append(result)
        return result

    def build_docs(self, dest: Path) -> Path:
        """Render this run's suites and results as GX Data Docs in ``dest`` (replaced whole); returns index.html."""
        staging = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        for site in list(self.context.list_data_docs_sites()):  # the default site writes to a temp folder
            self.context.delete_data_docs_site(site)
        self.context.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(staging)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        try:
            self.context.build_data_docs(site_names=[DOCS_SITE])
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            if dest.exists():
                dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest / "index.html"


def describe_failures(suite_name: str, result: Any, locate: Any = None, found: str | None = None) -> list[str]:
    """One line per failed expectation: the problem, what was expected and what was found.

    ``locate(column, rows)`` may add where the offending values are (lines, pixel columns); ``found``
    replaces GX's observed value (for the schema, whose observed value is the whole column list).
    """
    lines = []
    for res in result.results:
        if res.success:
            continue
        cfg = res.expectation_config
        column = cfg.kwargs.get("column")
        check = (cfg.meta or {}).get("check", cfg.type)
        r = res.result or {}
        if found is not None:
            observed = found
        elif res.exception_info and res.exception_info.get("raised_exception"):
            observed = f"GX error: {res.exception_info.get('exception_message')}"
        elif r.get("unexpected_count") and locate is not None:
            rows = r.get("partial_unexpected_index_list") or []
            where = locate(column, rows) or f"data rows {rows} with {column} {format_number(r.get('partial_unexpected_list'))}"
            observed = f"{r['unexpected_count']} of {r['element_count']} rows, e.g. {where}"
        elif r.get("partial_unexpected_list"):
            observed = format_value(r["partial_unexpected_list"][0])
        else:
            observed = format_number(r.get("observed_value"))
        what = f"{cfg.type}({column})" if column else cfg.type
        lines.append(f"{suite_name}: {check}: expected {expected_text(cfg.kwargs)}; found {observed} [{what}]")
    return lines


def expected_text(kwargs: dict[str, Any]) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if "column_list" in kwargs:
        cols = kwargs["column_list"]
        return f"{len(cols)} columns {cols[0]}, {cols[1]}, ..., {cols[-1]}" if len(cols) > 3 else ", ".join(cols)
    if "value_set" in kwargs:
        return f"a value in {format_number(kwargs['value_set'])}"
    if "value" in kwargs:
        return f"== {kwargs['value']}"
    if low is not None and high is not None:
        return f"between {format_value(low)} and {format_value(high)}"
    if low is not None:
        return f">= {format_value(low)}"
    if high is not None:
        return f"<= {format_value(high)}"
    return "not null" if "column" in kwargs else format_number(kwargs)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "empty"
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    return str(value)


def format_number(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 400 else text[:400] + "..."


class CellLocator:
    """Points at the offending cells of the rows GX flagged: line numbers and pixel columns with their values."""

    def __init__(self, parsed: ParsedSplit, columns: list[str]):
        self.parsed = parsed
        self.columns = columns

    def __call__(self, derived: str | None, rows: list[int]) -> str | None:
        matrix = self.parsed.matrix
        rows = [r for r in rows if isinstance(r, (int, np.integer)) and 0 <= r < len(matrix)]
        if not rows:
            return None
        if derived == LABEL_COLUMN:
            return ", ".join(f"line {self.parsed.line_of(r)} {LABEL_COLUMN}={format_value(float(matrix[r, 0]))}"
                             for r in rows)
        tests = {
            "row_max": lambda v: v > PIXEL_MAX,
            "row_min": lambda v: v < PIXEL_MIN,
            "row_nulls": np.isnan,
            "row_non_integer": lambda v: np.isfinite(v) & (v != np.round(v)),
        }
        if derived not in tests:
            return None
        found = []
        for r in rows:
            values = matrix[r, 1:].astype(np.float64)
            bad = np.flatnonzero(tests[derived](values))
            cells = ", ".join(f"{self.columns[1 + c]}={format_value(float(values[c]))}" for c in bad[:3])
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            found.append(f"line {self.parsed.line_of(r)} {cells}{more}")
        return "; ".join(found)
