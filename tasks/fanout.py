"""Fan-out: each dataset as its own flow run of the per-dataset deployment, on whichever worker is free.

The parent run creates one child run per dataset with ``run_deployment`` (linked to the parent as a
subflow, so the UI shows it under the parent), waits for all of them, and reports each child's final
state. One child failing does not stop the others: every child is waited for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import task

from tasks.outcome import DatasetOutcome
from tasks.versions import run_version_name

DATASET_DEPLOYMENT = "train-mnist/dataset"
CHILD_POLL_SECONDS = 5.0
TRAINING_WORK_QUEUE = "train"


@dataclass(frozen=True)
class ChildRun:
    """A finished child run, as the parent reports it."""

    dataset: str
    flow_run_id: UUID
    name: str
    version: str  # the child's own version (its scheduled start and run id), as it names what it publishes
    state: str  # Prefect state name: Completed, Failed, Crashed, Cancelled, ...
    message: str
    completed: bool


def child_parameters(parameters: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The parent's parameters for one dataset, run in-process by the child (no further fan-out)."""
    return {**{k: v for k, v in parameters.items() if v is not None}, "dataset": dataset, "fan_out": False}


def run_child(deployment: str, dataset: str, parameters: dict[str, Any],
              poll_seconds: float = CHILD_POLL_SECONDS) -> ChildRun:
    """Create the child run of ``dataset`` on ``deployment`` and wait for its final state."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=child_parameters(parameters, dataset), poll_interval=poll_seconds,
                         as_subflow=True, timeout=None)
    state = run.state
    return ChildRun(dataset=dataset, flow_run_id=run.id, name=run.name,
                    version=run_version_name(run.expected_start_time, run.id), state=state.name if state else "Unknown",
                    message=(state.message or "") if state else "", completed=bool(state and state.is_completed()))


@task(name="run-dataset", task_run_name="run-dataset-{dataset}")
def run_child_task(deployment: str, dataset: str, parameters: dict[str, Any]) -> ChildRun:
    return run_child(deployment, dataset, parameters)


def child_outcome(child: ChildRun) -> DatasetOutcome:
    """A fanned-out dataset's outcome, as its child run's final state tells it."""
    lines = [line for line in child.message.splitlines() if line.strip()]
    headline = f"{child.dataset}: child run {child.name} {child.state}" + (f": {lines[0]}" if lines else "")
    return DatasetOutcome(dataset=child.dataset, version=child.version, published=child.completed,
                          headline=headline, reasons=[line.lstrip("- ") for line in lines[1:]],
                          stage=None if child.completed else "child run", flow_run_id=str(child.flow_run_id))

