"""Retraining on events: the ``train-mnist/dataset`` deployment's trigger, and the guard every triggered run
passes first.

The trigger starts a run of the dataset an event names (``train-mnist.data.changed`` from the data-arrival
check, ``train-mnist.drift.detected`` from a model server), with ``triggered_by`` set to the event's name.
Prefect fires a reactive trigger on every matching event, so the debounce is the guard's: a triggered run
ends at once, Completed with the state name ``Skipped`` and the reason, when
- a run covering its dataset (a night with ``dataset=all``, a manual run, another triggered run) is Pending
  or Running and was created before it (the earlier of two simultaneous runs goes ahead), or
- another triggered run of its dataset that was not itself skipped started less than
  ``trigger_debounce_minutes`` ago.
The nightly schedule stays as it is.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.reporting import events

SKIPPED = "Skipped"
FLOW_NAME = "train-mnist"
DEBOUNCE_MINUTES = 60.0
EXPECTED = (events.DATA_CHANGED, events.DRIFT_DETECTED)


def trigger_parameters(debounce_minutes: float = DEBOUNCE_MINUTES) -> dict[str, Any]:
    """The run parameters the trigger fills in from the event (Jinja templates Prefect renders)."""
    return {"dataset": "{{ event.resource['" + events.DATASET_LABEL + "'] }}", "triggered_by": "{{ event.event }}",
            "trigger_debounce_minutes": debounce_minutes, "fan_out": False}


def retrain_trigger(debounce_minutes: float = DEBOUNCE_MINUTES):
    """One reactive trigger for every dataset: each event starts a run of the dataset it names."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name="retrain on new data or drift", expect=set(EXPECTED),
        match={"prefect.resource.id": f"{events.PREFIX}.dataset.*"}, for_each={"prefect.resource.id"},
        posture="Reactive", threshold=1, within=timedelta(0), parameters=trigger_parameters(debounce_minutes))


def covers(run_dataset: str | None, names: list[str]) -> bool:
    wanted = {n.strip() for n in (run_dataset or "all").split(",")}
    return "all" in wanted or bool(wanted & set(names))


def reason_to_skip(names: list[str], this_run: UUID, debounce: timedelta, runs: list[Any],
                   now: datetime | None = None) -> str | None:
    """Why this triggered run must not train (see the module doc), from the ``train-mnist`` flow runs ``runs``."""
    now = now or datetime.now(UTC)
    me = next((r for r in runs if r.id == this_run), None)
    mine = (me.created, str(me.id)) if me is not None and me.created else (now, str(this_run))
    for run in runs:
        if run.id == this_run or not covers(run.parameters.get("dataset"), names):
            continue
        state = run.state_type.value if run.state_type else ""
        earlier = run.created is not None and (run.created, str(run.id)) < mine
        if state in ("RUNNING", "PENDING") and earlier:
            return f"{', '.join(names)}: run {run.name} is already training it ({state.lower()})"
        started = run.start_time or run.expected_start_time
        if (run.parameters.get("triggered_by") and run.state_name != SKIPPED and started is not None
                and now - started < debounce and earlier):
            return (f"{', '.join(names)}: triggered run {run.name} started {int((now - started).total_seconds())} s "
                    f"ago; at most one triggered run per {debounce.total_seconds() / 60:g} minutes")
    return None


@task(name="trigger-guard", cache_policy=NO_CACHE)
def trigger_guard_task(names: list[str], debounce_minutes: float) -> str | None:
    """``reason_to_skip`` for the running flow run, from the Prefect server's recent ``train-mnist`` runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run

    debounce = timedelta(minutes=debounce_minutes)
    ours = FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
    active = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.RUNNING, StateType.PENDING])))
    recent = FlowRunFilter(start_time=FlowRunFilterStartTime(after_=datetime.now(UTC) - debounce))
    with get_client(sync_client=True) as client:
        me = client.read_flow_run(UUID(flow_run.id))
        runs = {r.id: r for query in (active, recent)
                for r in client.read_flow_runs(flow_filter=ours, flow_run_filter=query, limit=200)}
    runs[me.id] = me
    return reason_to_skip(names, me.id, debounce, list(runs.values()))
