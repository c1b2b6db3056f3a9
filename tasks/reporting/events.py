"""The Prefect events train-mnist emits, so automations, triggers and the model server can react to them.

    train-mnist.model.published    a dataset's run published a version and moved production
    train-mnist.model.refused      it passed its gates but was not promoted (champion comparison or canary)
    train-mnist.model.gate-failed  it failed its accuracy gates
    train-mnist.model.failed       it stopped before publishing could decide (download, validation, a bug)
    train-mnist.model.pinned       it trained, but production is pinned and stayed where it was
    train-mnist.model.rolled-back  an operator moved production back (``train-mnist rollback``)
    train-mnist.data.changed       the source's files for a dataset changed (``flows/data_watch.py``)
    train-mnist.drift.detected     a model server saw its inputs drift for longer than its hold time

Every event's resource is the dataset (``prefect.resource.id`` ``train-mnist.dataset.<name>``, with labels
``train-mnist.dataset`` and, where there is one, ``train-mnist.version``), so one trigger can follow one
dataset; the payload says why. Emitted from a run, the run is related to the event by Prefect itself.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.vocabulary import Outcome, Stage

logger = logging.getLogger("train_mnist.events")
PREFIX = "train-mnist"
DATASET_LABEL = "train-mnist.dataset"
VERSION_LABEL = "train-mnist.version"
PUBLISHED = f"{PREFIX}.model.published"
REFUSED = f"{PREFIX}.model.refused"
GATE_FAILED = f"{PREFIX}.model.gate-failed"
FAILED = f"{PREFIX}.model.failed"
PINNED = f"{PREFIX}.model.pinned"
ROLLED_BACK = f"{PREFIX}.model.rolled-back"
DATA_CHANGED = f"{PREFIX}.data.changed"
DRIFT_DETECTED = f"{PREFIX}.drift.detected"
PRODUCTION_MOVED = (PUBLISHED, ROLLED_BACK)  # what a model server reacts to at once


def dataset_resource(dataset: str, version: str | None = None) -> dict[str, str]:
    resource = {"prefect.resource.id": f"{PREFIX}.dataset.{dataset}", "prefect.resource.name": dataset,
                DATASET_LABEL: dataset}
    return resource | ({VERSION_LABEL: version} if version else {})


def event_for_outcome(published: bool, held: bool, stage: Stage | None, outcome: Outcome | None = None) -> str:
    """The event name of one dataset's result in a run."""
    if published:
        return PUBLISHED
    if held:
        return PINNED
    if stage == Stage.GATE or outcome == Outcome.GATE_FAILED:
        return GATE_FAILED
    if stage in (Stage.PROMOTION, Stage.CANARY) or outcome == Outcome.REFUSED:
        return REFUSED
    return FAILED


def emit(event: str, dataset: str, version: str | None = None, payload: dict[str, Any] | None = None) -> bool:
    """Emit ``event`` about ``dataset`` to the Prefect server this process reports to; False when it could not
    (no server, or the event was refused); never raises, since an event must not fail what it reports."""
    from prefect.context import FlowRunContext
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() and FlowRunContext.get() is None:
        return False  # no server to tell, and outside a run Prefect would start a temporary one just for this
    try:
        sent = emit_event(event, resource=dataset_resource(dataset, version), payload=payload or {})
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        logger.warning("event %s for %s not emitted: %s: %s", event, dataset, type(exc).__name__, exc)
        return False
    return sent is not None


def flush(timeout_s: float = 10.0) -> None:
    """Send what is queued before a short-lived process (a CLI command) exits."""
    from prefect.events.worker import EventsWorker

    try:
        EventsWorker.drain_all(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        logger.warning("events not sent: %s: %s", type(exc).__name__, exc)
