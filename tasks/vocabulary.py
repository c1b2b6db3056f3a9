"""The words a run is told in, defined once: the stage a dataset stopped at, and how its run ended.

Alerts, the run log, outcomes, exceptions and the command line all use these values; an expected failure
carries its own stage (``StageFailure.stage``), so nothing guesses a stage from the words of a message.
Both are ``StrEnum``s: they are written to labels, JSON and logs as their plain values (``"gate"``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Stage(StrEnum):
    """Where a dataset's run stopped."""

    DOWNLOAD = "download"
    VALIDATE = "validate"
    CHAMPION = "champion"  # the production model (or its data profile) could not be read
    CONVERT = "convert"
    TRAIN = "train"
    EVALUATE = "evaluate"
    GATE = "gate"
    PROMOTION = "promotion"  # worse than the production model
    CANARY = "canary"
    PUBLISH = "publish"  # the lock, the fence or the registry itself
    CHILD_RUN = "child run"  # a fanned-out run that ended without saying where it stopped
    UNEXPECTED = "unexpected error"  # a bug: its traceback is in the dataset run's log


class Outcome(StrEnum):
    """How a dataset's run ended, as its registry's run log records it."""

    PUBLISHED = "published"
    GATE_FAILED = "gate_failed"
    REFUSED = "refused"  # passed its gates, but not promoted (champion comparison or canary)
    FAILED = "failed"  # stopped by an expected failure before publishing could decide
    PINNED = "pinned"  # trained and evaluated, but production is pinned: it stays where it is
    ROLLED_BACK = "rolled_back"  # an operator moved production back (train-mnist rollback)
    PIN = "pin"  # an operator pinned production (train-mnist pin)
    UNPIN = "unpin"


class StageFailure(Exception):
    """An expected failure: told as one clean message, never a traceback, with the stage it stops a run at."""

    stage: ClassVar[Stage]
    outcome: ClassVar[Outcome] = Outcome.FAILED


def stage_of(exc: BaseException) -> Stage:
    """The stage an exception stops a run at: its own, or ``UNEXPECTED`` for anything that is not a StageFailure."""
    return exc.stage if isinstance(exc, StageFailure) else Stage.UNEXPECTED
