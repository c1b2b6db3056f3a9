"""What happened to each dataset of a run, and how it is told: state messages, the parent's summary, the log.

A dataset either publishes a version or stops at one stage for an expected reason (failed download
checks, failed validation, failed gate, refused or impossible champion comparison). An expected
failure is told once: one ERROR log line with its reasons, and a Failed state whose message starts
with what happened and lists the reasons below it as Markdown bullets (the Prefect UI renders state
messages as Markdown). Only a real bug shows a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.publishing.promote import PromotionDecision
from tasks.reporting import events
from tasks.results import GateDecision
from tasks.vocabulary import Stage, stage_of

NOT_PUBLISHED = "NOT PUBLISHED"
# Flow-run labels that say, as data, which datasets a run did not publish, where each stopped and why: the
# failure alert (deployments/alerts.py) and a fanned-out parent read these, never the words of a message.
FAILED_LABEL = "train-mnist.failed"
MAX_LABEL_CHARS = 1000


def stage_label(dataset: str) -> str:
    return f"train-mnist.{dataset}.stage"


def reason_label(dataset: str) -> str:
    return f"train-mnist.{dataset}.reason"


class NotPublished(Exception):
    """Raised by Prefect from the parent run's Failed state: some datasets were not published (all told already)."""


class DatasetOutcome(BaseModel):
    """One dataset's result in a run, published or not, with the numbers a user needs in either case."""

    dataset: str
    version: str
    published: bool
    held: bool = False  # not published because an operator pinned production: the run did what it should
    headline: str  # what happened, one line
    reasons: list[str] = []  # why (failed checks), one per line
    test_accuracy: float | None = None
    gate: GateDecision | None = None
    promotion: PromotionDecision | None = None
    stage: Stage | None = None  # where an unpublished dataset stopped
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
    failed = [o for o in outcomes if not o.published and not o.held]
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
    what = f"published {outcome.version}" if outcome.published else f"held by a pin ({outcome.headline})" \
        if outcome.held else \
        f"{NOT_PUBLISHED} ({outcome.headline.removeprefix(outcome.dataset + ': ')})"
    accuracy = f"; test accuracy {outcome.test_accuracy:.4f}" if outcome.test_accuracy is not None else ""
    gate = f"; gate {gate_cell(outcome)}; champion comparison: {champion_cell(outcome)}" if outcome.gate else ""
    return f"{outcome.dataset}: {what}{accuracy}{gate}; dataset run: {url or outcome.flow_run_id}"


# ---- outcomes from what the runs returned --------------------------------------------------------


def stopped_outcome(dataset: str, version: str, exc: BaseException, registry: str) -> DatasetOutcome:
    """A dataset stopped by an expected failure before training: logged once and added to its history."""
    from prefect import get_run_logger

    from tasks.artifacts import VALIDATION_HTML
    from tasks.registry import open_registry

    get_run_logger().error("%s", exc)
    report: Path | None = getattr(exc, "report_path", None)
    html = report.with_name(VALIDATION_HTML) if report is not None else None
    outcome = DatasetOutcome.from_exception(dataset, version, exc, stage=stage_of(exc),
                                            validation_report=str(html) if html and html.is_file() else None)
    try:
        open_registry(registry).record_failure(dataset, version, outcome.stage, outcome.headline, report,
                                               getattr(exc, "drift", None))
    except Exception as history_exc:  # noqa: BLE001 - the run's outcome stands; its history line is a view
        get_run_logger().warning("%s: history of run %s not recorded: %s", dataset, version, history_exc)
    return outcome


@task(name="stopped", task_run_name="stopped-{dataset}", cache_policy=NO_CACHE)
def stopped_task(dataset: str, version: str, exc: BaseException, registry: str) -> DatasetOutcome:
    """``stopped_outcome`` as a task: the flow hands the failure on, this records it."""
    return stopped_outcome(dataset, version, exc, registry)


def outcome_of(name: str, version: str, state) -> DatasetOutcome:
    """A dataset run's outcome: its returned value, the outcome its Failed state carries, or the bug that stopped it."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, DatasetOutcome):
        outcome = result
    else:
        exc = result if isinstance(result, BaseException) else RuntimeError(state.message or state.name)
        outcome = DatasetOutcome(dataset=name, version=version, published=False, stage=Stage.UNEXPECTED,
                                 headline=f"{name}: stopped by an unexpected error (traceback in the {name} run's log)",
                                 reasons=[f"{type(exc).__name__}: {exc}"])
    run_id = state.state_details.flow_run_id
    return outcome.model_copy(update={"flow_run_id": str(run_id) if run_id else None})


def emit_outcome_events(outcomes: list[DatasetOutcome]) -> None:
    """One event per dataset's result (``tasks.reporting.events``); a fanned-out parent leaves this to its children."""
    for outcome in outcomes:
        name = events.event_for_outcome(outcome.published, outcome.held, outcome.stage)
        events.emit(name, outcome.dataset, outcome.version, {
            "headline": outcome.headline, "reasons": outcome.reasons[:20], "test_accuracy": outcome.test_accuracy,
            "stage": outcome.stage.value if outcome.stage else None, "flow_run_id": outcome.flow_run_id})


def summarize_outcomes(outcomes: list[DatasetOutcome], version: str):
    """The parent run's log lines and summary artifact; the published versions, or a Failed state naming each
    dataset and why."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact
    from prefect.states import Failed
    from prefect.utilities.urls import url_for

    logger = get_run_logger()
    urls = {o.dataset: url_for("flow-run", obj_id=o.flow_run_id) if o.flow_run_id else None for o in outcomes}
    published = sum(o.published for o in outcomes)
    for outcome in outcomes:  # the parent's own log says what happened, without repeating the reasons
        (logger.info if outcome.published else logger.warning)("%s", outcome_line(outcome, urls[outcome.dataset]))
    try:
        create_markdown_artifact(key="train-mnist-summary", markdown=run_summary_markdown(outcomes, urls),
                                 description=f"train-mnist {version}: {published} of {len(outcomes)} published")
    except Exception as exc:  # noqa: BLE001 - a view; the outcome must not depend on it
        logger.warning("could not create the run's summary artifact: %s: %s", type(exc).__name__, exc)
    if any(not o.published and not o.held for o in outcomes):
        try:
            label_failures(outcomes)
        except Exception as exc:  # noqa: BLE001 - the alert falls back to the state message
            logger.warning("could not label the run with its failures: %s: %s", type(exc).__name__, exc)
        message = run_failure_message(outcomes)
        return Failed(message=message, data=NotPublished(message))
    return {o.dataset: o.version for o in outcomes if o.published}  # a pinned dataset published nothing


def failure_labels(outcomes: list[DatasetOutcome]) -> dict[str, str]:
    """Each unpublished dataset, the stage it stopped at and why, as flow-run labels."""
    failed = [o for o in outcomes if not o.published and not o.held]
    labels = {FAILED_LABEL: ",".join(o.dataset for o in failed)}
    for o in failed:
        labels[stage_label(o.dataset)] = str(o.stage or "unknown")
        labels[reason_label(o.dataset)] = "; ".join([o.headline, *o.reasons])[:MAX_LABEL_CHARS]
    return labels


def label_failures(outcomes: list[DatasetOutcome]) -> None:
    """Put ``failure_labels`` on the current flow run (before it ends, so its Failed event carries them)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run.id, failure_labels(outcomes))


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
