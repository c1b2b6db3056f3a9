"""The event trigger of ``train-mnist/dataset`` and the guard that debounces what it starts (plain functions, and
the same trigger in ``serve_deployments.py`` and ``prefect.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from uuid import UUID, uuid4

import pytest
import yaml

from deployments.serve_deployments import dataset
from tasks.orchestration.triggers import SKIPPED, reason_to_skip, retrain_trigger
from tasks.settings import PROJECT_ROOT

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


class State(Enum):
    RUNNING = "RUNNING"
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"


@dataclass
class Run:
    parameters: dict
    state_type: State
    created: datetime
    start_time: datetime | None = None
    state_name: str = "Completed"
    name: str = "a-run"
    expected_start_time: datetime | None = None
    id: UUID = field(default_factory=uuid4)


def me(minutes_ago: float = 0) -> Run:
    at = NOW - timedelta(minutes=minutes_ago)
    return Run({"dataset": "mnist", "triggered_by": "train-mnist.data.changed"}, State.RUNNING, at, at, "Running",
               "me")


def test_a_triggered_run_alone_trains():
    mine = me()
    assert reason_to_skip(["mnist"], mine.id, HOUR, [mine], NOW) is None


@pytest.mark.parametrize("dataset", ["all", "mnist", "fashion-mnist,mnist", None])
def test_a_running_night_or_run_of_the_dataset_makes_it_skip(dataset):
    mine = me()
    night = Run({"dataset": dataset} if dataset else {}, State.RUNNING, NOW - HOUR, NOW - HOUR, "Running", "nightly")
    assert "nightly is already training it" in reason_to_skip(["mnist"], mine.id, HOUR, [mine, night], NOW)


def test_a_run_of_another_dataset_does_not_count():
    mine = me()
    other = Run({"dataset": "fashion-mnist"}, State.RUNNING, NOW - HOUR, NOW - HOUR, "Running")
    assert reason_to_skip(["mnist"], mine.id, HOUR, [mine, other], NOW) is None


def test_of_two_simultaneous_triggered_runs_exactly_one_trains():
    first, second = me(), me()
    second.created = first.created  # same instant: the id breaks the tie, the same way for both
    runs = [first, second]
    verdicts = [reason_to_skip(["mnist"], r.id, HOUR, runs, NOW) for r in runs]
    assert sorted(v is None for v in verdicts) == [False, True]


def test_a_triggered_run_within_the_debounce_makes_the_next_skip_and_one_past_it_does_not():
    mine = me()
    recent = Run({"dataset": "mnist", "triggered_by": "train-mnist.drift.detected"}, State.COMPLETED,
                 NOW - timedelta(minutes=20), NOW - timedelta(minutes=20), name="earlier")
    assert "at most one triggered run per 60 minutes" in reason_to_skip(["mnist"], mine.id, HOUR, [mine, recent], NOW)
    assert reason_to_skip(["mnist"], mine.id, timedelta(minutes=10), [mine, recent], NOW) is None
    recent.state_name = SKIPPED  # a skipped run trained nothing: it does not hold the next one back
    assert reason_to_skip(["mnist"], mine.id, HOUR, [mine, recent], NOW) is None


def test_a_finished_nightly_run_does_not_hold_a_triggered_one_back():
    mine = me()
    night = Run({"dataset": "all"}, State.COMPLETED, NOW - HOUR, NOW - HOUR, name="nightly")
    assert reason_to_skip(["mnist"], mine.id, HOUR, [mine, night], NOW) is None


def test_serve_and_the_yaml_give_the_dataset_deployment_the_same_trigger():
    served = dataset().triggers[0]
    spec = next(d for d in yaml.safe_load((PROJECT_ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
                if d["name"] == "dataset")
    [from_yaml] = spec["triggers"]
    assert set(from_yaml["expect"]) == served.expect == {"train-mnist.data.changed", "train-mnist.drift.detected"}
    assert from_yaml["match"] == served.match.root and set(from_yaml["for_each"]) == served.for_each
    assert from_yaml["parameters"] == {**served.parameters, "trigger_debounce_minutes": 60}
    assert (from_yaml["posture"], from_yaml["threshold"], from_yaml["within"]) == ("Reactive", 1, 0)
    assert retrain_trigger(5).parameters["trigger_debounce_minutes"] == 5
