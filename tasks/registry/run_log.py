"""Per-dataset run log and its trend plot, kept in the folder registry.

``<registry>/<dataset>/runs.jsonl`` gets one JSON line per run: version, date, outcome, test
accuracy, lowest class recall, the gate and promotion decisions, the canary's timings, the drift
numbers of its validation and the wall time of each stage, all from the values the run holds. Each line
is appended with a single ``write`` on an ``O_APPEND`` descriptor and fsynced, so a kill leaves whole
lines; a line torn anyway (the disk full mid-write) is skipped and counted when read, and the next
append starts on a new line, so it never swallows the entry after it. Publishing appends under the
dataset's lock. A registry made before the log had this name keeps ``history.jsonl``: it is read first,
never written again.

``<registry>/<dataset>/runs.png`` is rendered from the whole file after each publish (written under
a temporary name and renamed): accuracy and lowest recall per version, drift per version, and stage
times, with failed and refused runs marked, so a drop last night or drift creeping up shows at a glance.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks import artifacts, storage
from tasks.publishing.canary import CanaryResult
from tasks.publishing.promote import PromotionDecision
from tasks.results import GateDecision, Metrics
from tasks.vocabulary import Outcome, Stage

RUN_LOG_FILE = artifacts.RUN_LOG
TREND_FILE = artifacts.TREND_PNG
# The drift numbers plotted (from validation.json's "drift" section; all of them are recorded): label
# KL on the left axis, the mean pixel value on the right one.
TREND_LABEL_DRIFT = ("train.label_kl", "test.label_kl")
TREND_PIXEL_DRIFT = ("train.pixel_mean", "test.pixel_mean")

OPERATIONS = (Outcome.ROLLED_BACK, Outcome.PIN, Outcome.UNPIN)  # an operator's actions, not training runs

logger = logging.getLogger(__name__)


class RunLogEntry(BaseModel):
    version: str
    date: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    outcome: Outcome
    stage: Stage | None = None  # where a run that did not publish stopped
    reason: str | None = None
    test_accuracy: float | None = None
    lowest_class_recall: float | None = None
    lowest_recall_class: str | None = None
    gate_passed: bool | None = None
    promoted: bool | None = None
    champion_version: str | None = None
    champion_accuracy: float | None = None
    canary_load_s: float | None = None
    canary_latency_s: float | None = None
    from_version: str | None = None  # a rollback's or pin's production before it
    requested_by: str | None = None  # who or what asked for a rollback, pin or unpin
    drift: dict[str, float] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)


def run_log_path(registry: Path, dataset: str) -> Path:
    return registry / dataset / RUN_LOG_FILE


def trend_path(registry: Path, dataset: str) -> Path:
    return registry / dataset / TREND_FILE


def append_entry(registry: Path, dataset: str, entry: RunLogEntry) -> Path:
    """Append one line to the dataset's run log (one write, fsynced), on a line of its own."""
    path = run_log_path(registry, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(_finite(entry.model_dump(mode="json")), separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # the last entry was torn: it stays unreadable, this one must not be
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_run_log(registry: Path, dataset: str) -> list[RunLogEntry]:
    """Every whole line of the dataset's run log (its legacy ``history.jsonl`` first), oldest first; a torn or
    foreign line is skipped, counted and logged."""
    entries, skipped = [], 0
    for path in (registry / dataset / artifacts.LEGACY_RUN_LOG, run_log_path(registry, dataset)):
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(RunLogEntry.model_validate_json(line))
            except ValueError as exc:
                skipped += 1
                logger.warning("%s line %d skipped, not a run log entry: %s", path, number, str(exc).splitlines()[0])
    if skipped:
        logger.warning("%s: %d line(s) of its run log skipped", dataset, skipped)
    return entries


def render_trend(entries: list[RunLogEntry], dest: Path, title: str) -> Path:
    """The trend PNG: quality, drift and stage times per run; failed and refused runs marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in entries if e.outcome not in OPERATIONS]  # runs only; rollbacks and pins are in the table
    x = list(range(len(entries)))
    labels = [e.version.split("-")[0] for e in entries]
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.5 * len(entries) + 4), 10), dpi=100, sharex=True)
    quality, drift, times = axes
    for field_name, label in (("test_accuracy", "test accuracy"), ("lowest_class_recall", "lowest class recall")):
        quality.plot(x, [_nan(getattr(e, field_name)) for e in entries], marker="o", label=label)
    bad = [i for i, e in enumerate(entries) if e.outcome not in (Outcome.PUBLISHED, Outcome.PINNED)]
    for i in bad:
        quality.axvline(i, color="red", alpha=0.25, linewidth=6)
    if bad:
        quality.plot([], [], color="red", alpha=0.25, linewidth=6, label="not published (failed/refused)")
    quality.set_ylabel("share")
    quality.set_title(title)
    pixel_axis = drift.twinx()
    for ax, keys, style in ((drift, TREND_LABEL_DRIFT, "o-"), (pixel_axis, TREND_PIXEL_DRIFT, "s--")):
        for key in keys:
            values = [e.drift.get(key, math.nan) for e in entries]
            if any(not math.isnan(v) for v in values):
                ax.plot(x, values, style, markersize=4, label=key)
    drift.set_ylabel("label KL vs reference")
    pixel_axis.set_ylabel("mean pixel value")
    if pixel_axis.get_legend_handles_labels()[0]:
        pixel_axis.legend(fontsize=7, loc="upper right")
    stages = sorted({s for e in entries for s in e.stage_seconds})
    bottom = [0.0] * len(entries)
    for stage in stages:
        heights = [e.stage_seconds.get(stage, 0.0) for e in entries]
        times.bar(x, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    times.set_ylabel("wall time per stage (s)")
    times.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left" if ax is drift else "best")
    fig.tight_layout()
    try:
        with storage.atomic_path(dest) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return dest


def markdown_table(entries: list[RunLogEntry], last: int = 14) -> str:
    """The last ``last`` runs as a Markdown table (the Prefect artifact)."""
    rows = ["| version | date | outcome | test accuracy | lowest recall | test label KL | wall time (s) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries[-last:]:
        rows.append(f"| {e.version} | {e.date} | {e.outcome}{f' ({e.stage})' if e.stage else ''} | "
                    f"{_fmt(e.test_accuracy)} | {_fmt(e.lowest_class_recall)} | {_fmt(e.drift.get('test.label_kl'))} | "
                    f"{sum(e.stage_seconds.values()):.0f} |")
    return "\n".join(rows) + "\n"


def prefect_stage_seconds() -> dict[str, float]:
    """Wall time of each finished task run of the current Prefect flow run (empty outside one)."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is None or context.flow_run is None:
            return {}
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[context.flow_run.id])))
    except Exception as exc:  # noqa: BLE001 - the history must not fail a publish
        logger.warning("stage times not available from Prefect: %s", exc)
        return {}
    seconds: dict[str, float] = {}
    for run in runs:
        stage = run.name.split("-")[0]
        if run.total_run_time:
            seconds[stage] = seconds.get(stage, 0.0) + run.total_run_time.total_seconds()
    return seconds


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items() if not (isinstance(v, float) and not math.isfinite(v))}
    return value


def record_run(registry: Path, dataset: str, version: str, outcome: Outcome, metrics: Metrics | None = None,
               decision: GateDecision | None = None, drift: dict[str, float] | None = None,
               publish_s: float | None = None, *, promotion: PromotionDecision | None = None,
               canary: CanaryResult | None = None, reason: str | None = None, stage: Stage | None = None) -> RunLogEntry:
    """Append this run's entry (under the caller's dataset lock), re-render the trend plot and, inside a
    Prefect run, publish the run log as an artifact. Every number comes from the values the run holds.
    A failure here is logged, never raised over the run's own result."""
    fields: dict[str, Any] = {"version": version, "outcome": outcome, "reason": reason, "stage": stage}
    if metrics is not None:
        worst = min(metrics.recall, key=metrics.recall.__getitem__)
        fields |= {"test_accuracy": metrics.test_accuracy, "lowest_class_recall": metrics.recall[worst],
                   "lowest_recall_class": worst}
    if decision is not None:
        fields["gate_passed"] = decision.passed
    if outcome == Outcome.REFUSED:
        fields["promoted"] = False
    if promotion is not None:
        fields |= {"promoted": promotion.promoted, "champion_version": promotion.champion_version,
                   "champion_accuracy": promotion.champion_accuracy}
    if canary is not None:
        fields |= {"canary_load_s": canary.load_s, "canary_latency_s": canary.latency_s}
    stage_seconds = prefect_stage_seconds()
    if publish_s is not None:
        stage_seconds["publish"] = publish_s
    entry = RunLogEntry(**fields, drift=drift or {}, stage_seconds=stage_seconds)
    try:
        append_entry(registry, dataset, entry)
        entries = read_run_log(registry, dataset)
        png = render_trend(entries, trend_path(registry, dataset), f"{dataset}: run log of {len(entries)} run(s)")
        _create_artifact(dataset, entries, png)
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands; a broken history is reported, not fatal
        logger.warning("%s: history of run %s not recorded: %s", dataset, version, exc)
    return entry


def record_operation(registry: Path, dataset: str, outcome: Outcome, version: str, from_version: str | None,
                     reason: str | None, requested_by: str) -> RunLogEntry:
    """An operator's rollback, pin or unpin as a line of the run log (under the caller's dataset lock);
    ``version`` is production after it, ``from_version`` before."""
    entry = RunLogEntry(version=version, outcome=outcome, from_version=from_version, reason=reason,
                        requested_by=requested_by)
    append_entry(registry, dataset, entry)
    return entry


def production_history(entries: list[RunLogEntry]) -> list[str]:
    """The versions production has named, oldest first: each publish and each rollback moved it."""
    return [e.version for e in entries if e.outcome in (Outcome.PUBLISHED, Outcome.ROLLED_BACK)]


def _create_artifact(dataset: str, entries: list[RunLogEntry], png: Path) -> None:
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return  # called outside a Prefect run (tests, scripts): there is no run to attach an artifact to
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key=f"{dataset.replace('_', '-')}-history",
        markdown=f"# {dataset}: history\n\nTrend plot: [{png}]({png.as_uri()})\n\n{markdown_table(entries)}",
        description=f"{dataset}: the last runs, and the trend plot's path",
    )
