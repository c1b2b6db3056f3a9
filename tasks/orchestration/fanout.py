"""Fan-out: each dataset as its own flow run of the per-dataset deployment, on whichever worker is free.

The parent run creates one child run per dataset with ``run_deployment`` (linked to the parent as a
subflow, so the UI shows it under the parent), waits for all of them, and reports each child's final
state. One child failing does not stop the others: every child is waited for, and a child that cannot be
created or followed (a missing deployment, an API error) is reported like a failed one. No child is waited
for past its deadline: one still Scheduled, Pending or Running then is cancelled, and reported with the
state it was stuck in (with no worker on the ``train`` queue, a run would otherwise wait forever, and every
later night would queue behind it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import task

from tasks.orchestration.versions import run_version_name
from tasks.reporting.outcomes import DatasetOutcome, stage_label
from tasks.vocabulary import Stage

DATASET_DEPLOYMENT = "train-mnist/dataset"
CHILD_POLL_SECONDS = 5.0
TRAINING_WORK_QUEUE = "train"
# A nightly child trains one dataset: ~25 min on a fast 2-core machine, ~75 on a slow one; 4 h means stuck.
CHILD_TIMEOUT_MINUTES = 240.0
NOT_STARTED = ("SCHEDULED", "PENDING")


@dataclass(frozen=True)
class ChildRun:
    """A finished child run, as the parent reports it."""

    dataset: str
    flow_run_id: UUID | None  # None when the run could not be created
    name: str
    version: str  # the child's own version (its scheduled start and run id), as it names what it publishes
    state: str  # Prefect state name: Completed, Failed, Crashed, Cancelled, ...
    message: str
    completed: bool
    stage: Stage | None = None  # where the child's dataset stopped, as the child run's labels say


def child_parameters(parameters: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The parent's parameters for one dataset, run in-process by the child (no further fan-out)."""
    return {**{k: v for k, v in parameters.items() if v is not None}, "dataset": dataset, "fan_out": False}


def run_child(deployment: str, dataset: str, parameters: dict[str, Any], timeout_minutes: float = CHILD_TIMEOUT_MINUTES,
              poll_seconds: float = CHILD_POLL_SECONDS) -> ChildRun:
    """Create the child run of ``dataset`` on ``deployment`` and wait for its final state, at most
    ``timeout_minutes``; then cancel it. Never raises: a child that could not be run is a failed ChildRun."""
    from prefect.deployments import run_deployment

    try:
        run = run_deployment(deployment, parameters=child_parameters(parameters, dataset), poll_interval=poll_seconds,
                             as_subflow=True, timeout=timeout_minutes * 60)
    except Exception as exc:  # noqa: BLE001 - reported as this child's outcome; the other children go on
        return ChildRun(dataset=dataset, flow_run_id=None, name=f"on {deployment}", version="-", state="NotRun",
                        message=f"could not be created or followed: {type(exc).__name__}: {exc}", completed=False)
    state = run.state
    name, message = (state.name, state.message or "") if state else ("Unknown", "")
    if not (state and state.is_final()):
        stuck = state.type.value if state else ""
        cancel_run(run.id, stuck)
        name = f"Cancelled while {name}"
        message = (f"no final state within the child deadline of {timeout_minutes:g} min (parameter "
                   "child_timeout_minutes); cancelled")
        message += ", no worker picked it up" if stuck in NOT_STARTED else ""
    completed = bool(state and state.is_completed())
    return ChildRun(dataset=dataset, flow_run_id=run.id, name=run.name,
                    version=run_version_name(run.expected_start_time, run.id), state=name, message=message,
                    completed=completed, stage=None if completed else child_stage(run.id, dataset))


def child_stage(run_id: UUID, dataset: str) -> Stage | None:
    """The stage the child run's dataset stopped at, from the labels it set before it ended."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        label = (client.read_flow_run(run_id).labels or {}).get(stage_label(dataset))
    return Stage(label) if label in Stage._value2member_map_ else None


def cancel_run(run_id: UUID, state_type: str) -> None:
    """Cancel a flow run: at once if no worker has it yet, through its worker (Cancelling) if it runs."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    reason = "cancelled by its parent run: past the child deadline"
    with get_client(sync_client=True) as client:
        new = Cancelled(message=reason) if state_type in NOT_STARTED or not state_type else Cancelling(message=reason)
        client.set_flow_run_state(run_id, new, force=True)


@task(name="run-dataset", task_run_name="run-dataset-{dataset}")
def run_child_task(deployment: str, dataset: str, parameters: dict[str, Any],
                   timeout_minutes: float = CHILD_TIMEOUT_MINUTES) -> ChildRun:
    return run_child(deployment, dataset, parameters, timeout_minutes)


def child_outcome(child: ChildRun) -> DatasetOutcome:
    """A fanned-out dataset's outcome, as its child run's final state tells it."""
    lines = [line for line in child.message.splitlines() if line.strip()]
    headline = f"{child.dataset}: child run {child.name} {child.state}" + (f": {lines[0]}" if lines else "")
    return DatasetOutcome(dataset=child.dataset, version=child.version, published=child.completed,
                          headline=headline, reasons=[line.lstrip("- ") for line in lines[1:]],
                          stage=None if child.completed else child.stage or Stage.CHILD_RUN,
                          flow_run_id=str(child.flow_run_id) if child.flow_run_id else None)

