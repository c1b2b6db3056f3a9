"""Validation's parts: the one CSV reader (``csvfile``), the careful reader that says what is wrong
(``lenient``), the Great Expectations suites and how failures are told (``expectations``), label and
mean-image profiles and drift (``profiling``), and the offline HTML report (``report``). The stage
itself is ``validate``. May import the top level and ``orchestration.caching``.
"""

from __future__ import annotations

from pathlib import Path

from tasks.vocabulary import Stage, StageFailure


class DataValidationError(StageFailure):
    """The data failed validation; the message lists every failed check with what was observed."""
    stage = Stage.VALIDATE

    def __init__(self, message: str, report_path: Path | None = None, drift: dict[str, float] | None = None):
        super().__init__(message + (f"\nreport: {report_path}" if report_path else ""))
        self.report_path = report_path
        self.drift = drift or {}  # the scalar drift numbers measured before it failed, for the run log
