"""What happened to each dataset of a run, and how it is told: state messages, the parent's summary, the log.

A dataset either publishes a version or stops at one stage for an expected reason (failed download
checks, failed validation, failed gate, refused or impossible champion comparison). An expected
failure is told once: one ERROR log line with its reasons, and a Failed state whose message starts
with what happened and lists the reasons below it as Markdown bullets (the Prefect UI renders state
messages as Markdown). Only a real bug shows a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydantic import BaseModel

from tasks.gate import GateDecision
from tasks.promote import PromotionDecision

NOT_PUBLISHED = "NOT PUBLISHED"
ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")


class NotPublished(Exception):
    """Raised by Prefect from the parent run's Failed state: some datasets were not published (all told already)."""


class DatasetOutcome(BaseModel):
    """One dataset's result in a run, published or not, with the numbers a user needs in either case."""

    dataset: str
    version: str
    published: bool
    headline: str  # what happened, one line
    reasons: list[str] = []  # why (failed checks), one per line
    test_accuracy: float | None = None
    gate: GateDecision | None = None
    promotion: PromotionDecision | None = None
    registry_path: str | None = None  # the published version's folder
    validation_report: str | None = None  # the offline HTML validation report
    flow_run_id: str | None = None  # the dataset's own train-dataset run

    @classmethod
    def from_exception(cls, dataset: str, version: str, exc: BaseException, **fields) -> DatasetOutcome:
        """An outcome from an error message laid out as ``headline:\\n- reason\\n- reason``."""
        headline, reasons = split_message(str(exc))
        return cls(dataset=dataset, version=version, published=False, headline=headline, reasons=reasons, **fields)

    def state_message(self) -> str:
        """First line what happened; the reasons below as a Markdown list."""
        return markdown_message(self.headline, self.reasons)


def split_message(text: str) -> tuple[str, list[str]]:
    """``"headline:\\n- a\\n- b"`` -> ``("headline", ["a", "b"])``."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "failed", []
    return lines[0].rstrip(":"), [line.removeprefix("- ") for line in lines[1:]]


def markdown_message(headline: str, reasons: Iterable[str]) -> str:
    reasons = list(reasons)
    return headline + ("\n\n" + "\n".join(f"- {r}" for r in reasons) if reasons else "")


def run_failure_message(outcomes: list[DatasetOutcome]) -> str:
    """The parent run's state message: how many datasets failed, then each one's headline and reasons.

    Plain lines, no Markdown emphasis: the UI shows state messages as text.
    """
    failed = [o for o in outcomes if not o.published]
    lines = [f"{len(failed)} of {len(outcomes)} dataset(s) not published: {', '.join(o.dataset for o in failed)}"]
    for outcome in failed:
        lines += ["", outcome.headline]
        lines += [f"- {r}" for r in outcome.reasons]
    published = [o for o in outcomes if o.published]
    if published:
        lines += ["", "Published: " + ", ".join(f"{o.dataset} {o.version}" for o in published)]
    return "\n".join(lines)


def outcome_line(outcome: DatasetOutcome, url: str | None) -> str:
    """One log line for the parent run: the dataset's outcome, its numbers and where its run is."""
    what = f"published {outcome.version}" if outcome.published else \
        f"{NOT_PUBLISHED} ({outcome.headline.removeprefix(outcome.dataset + ': ')})"
    accuracy = f"; test accuracy {outcome.test_accuracy:.4f}" if outcome.test_accuracy is not None else ""
    gate = f"; gate {gate_cell(outcome)}; champion comparison: {champion_cell(outcome)}" if outcome.gate else ""
    return f"{outcome.dataset}: {what}{accuracy}{gate}; dataset run: {url or outcome.flow_run_id}"


# ---- the parent run's summary ---------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def gate_cell(outcome: DatasetOutcome) -> str:
    if outcome.gate is None:
        return "not reached"
    failed = [r for r in outcome.gate.reasons if r.startswith("FAIL")]
    return "passed" if outcome.gate.passed else f"FAILED ({len(failed)} check(s))"


def champion_cell(outcome: DatasetOutcome) -> str:
    p = outcome.promotion
    if p is None:
        return "not compared"
    verdict = "promoted" if p.promoted else "REFUSED"
    if p.champion_version is None:
        return f"{verdict} (first version)"
    return f"{verdict} ({p.challenger_accuracy:.4f} vs {p.champion_accuracy:.4f}, p={p.p_value:.3g})"


def short_headline(outcome: DatasetOutcome) -> str:
    text = outcome.headline.removeprefix(f"{outcome.dataset}: ")
    return text.split(", nothing published")[0]


def run_summary_markdown(outcomes: list[DatasetOutcome], run_urls: dict[str, str | None]) -> str:
    """The parent run's artifact: one row per dataset (linked to its run), then each one's reasons and paths."""
    published = sum(o.published for o in outcomes)
    lines = [
        f"# train-mnist: {published} of {len(outcomes)} dataset(s) published",
        "",
        "Each dataset links to its own run (logs of every stage, its confusion matrix and summary).",
        "",
        "| dataset (its run) | outcome | test accuracy | gate | champion comparison |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        outcome = f"published {o.version}" if o.published else f"**{NOT_PUBLISHED}**: {short_headline(o)}"
        accuracy = f"{o.test_accuracy:.4f}" if o.test_accuracy is not None else "-"
        url = run_urls.get(o.dataset)
        dataset = f"[{o.dataset}]({url})" if url else o.dataset
        lines.append("| " + " | ".join(_cell(c) for c in (dataset, outcome, accuracy, gate_cell(o), champion_cell(o)))
                     + " |")
    for o in outcomes:
        lines += ["", f"## {o.dataset}: {'published ' + o.version if o.published else NOT_PUBLISHED}", ""]
        if not o.published:
            lines += [f"**{o.headline}**", ""] + [f"- {r}" for r in o.reasons] + [""]
        if o.flow_run_id:
            lines.append(f"Dataset run: {f'[{o.flow_run_id}]({run_urls[o.dataset]})' if run_urls.get(o.dataset) else o.flow_run_id}")
            lines.append("")
        if o.promotion is not None and o.promotion.champion_version:
            lines += [f"Compared with champion `{o.promotion.champion_version}` on the same "
                      f"{o.promotion.test_rows} test rows.", ""]
        if o.registry_path:
            lines += [f"Registry folder: `{o.registry_path}`", ""]
        if o.validation_report:
            lines.append(f"Validation report (self-contained HTML, opens offline): `{o.validation_report}`")
    return "\n".join(lines) + "\n"


# ---- the log: one clean line per expected failure -------------------------------------------------


class ExpectedFailureLogFilter(logging.Filter):
    """Keeps Prefect's engines from repeating an expected failure with tracebacks.

    Prefect 3.8 logs a task's exception with its traceback ("Task run failed with exception"), its
    final state at ERROR with the whole message, and, for a deployment run that ends Failed, "Engine
    execution exited with unexpected exception" with another traceback. For the expected failures
    (``expected``) the run already logs the reasons once and its state message holds them, so records
    carrying such an exception are dropped and the task's final-state line becomes one short INFO
    line. Any other exception is logged by Prefect as usual, traceback included.
    """

    def __init__(self, expected: tuple[type[BaseException], ...]):
        super().__init__("train-mnist-expected-failures")
        self.expected = (*expected, NotPublished)
        self._markers = tuple(f"encountered an exception {cls.__name__}:" for cls in self.expected)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, self.expected):
            return False
        if record.levelno >= logging.ERROR and isinstance(record.msg, str) \
                and record.msg.startswith("Finished in state Failed(") and any(m in record.msg for m in self._markers):
            first = record.msg.split("\\n", 1)[0].split("\n", 1)[0]
            record.msg, record.args = "%s", (first.replace("Finished in state Failed('Task run encountered an "
                                                          "exception ", "Finished in state Failed: ", 1),)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_expected_failures(expected: tuple[type[BaseException], ...]) -> None:
    """Install the filter on Prefect's engine loggers once per process (a flow calls this when it starts)."""
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, ExpectedFailureLogFilter)]
        logger.addFilter(ExpectedFailureLogFilter(expected))
