"""Validation's parts: the one CSV reader (``csvfile``), the careful reader that says what is wrong
(``lenient``), the Great Expectations suites and how failures are told (``expectations``), label and
mean-image profiles and drift (``profiling``), and the offline HTML report (``report``). The stage
itself is ``tasks.validate``.
"""

from __future__ import annotations

from pathlib import Path


class DataValidationError(Exception):
    """The data failed validation; the message lists every failed check with what was observed."""

    def __init__(self, message: str, report_path: Path | None = None):
        super().__init__(message + (f"\nreport: {report_path}" if report_path else ""))
        self.report_path = report_path
