"""The operator's flows: roll production back, pin it, unpin it; served as deployments so the Prefect UI runs
them from a form (``rollback/train-mnist``, ``pin/train-mnist``, ``unpin/train-mnist``).

Wiring only: each calls its task (``tasks.publishing.operations``, under the publish lock, fenced, with the
canary and a run log line) and posts a Prefect artifact saying what changed. A refusal fails the run with
its one-line reason; production is unchanged then.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from tasks.publishing.operations import operation_task

Dataset = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]


@flow(name="rollback", flow_run_name="rollback {dataset}")
def rollback_flow(dataset: Dataset, to: str | None = None, reason: str = "", registry: str | None = None) -> str:
    """Move production back to the version before the current one, or to ``to``, if its canary passes.

    Args:
        dataset: The dataset whose production model goes back.
        to: The version to go back to (default: the one production named before the current one).
        reason: Why, for the run log.
        registry: A folder or an MLflow URL (default: the configured registry).
    """
    return operation_task("rollback", dataset, registry, reason, to)


@flow(name="pin", flow_run_name="pin {dataset}")
def pin_flow(dataset: Dataset, reason: str = "", registry: str | None = None) -> str:
    """Freeze production where it is: nightly runs still train and record, but never move it.

    Args:
        dataset: The dataset whose production model is frozen.
        reason: Why, for the run log and every nightly run it holds back.
        registry: A folder or an MLflow URL (default: the configured registry).
    """
    return operation_task("pin", dataset, registry, reason)


@flow(name="unpin", flow_run_name="unpin {dataset}")
def unpin_flow(dataset: Dataset, reason: str = "", registry: str | None = None) -> str:
    """End a pin: the next nightly run may move production again.

    Args:
        dataset: The dataset whose pin ends.
        reason: Why, for the run log.
        registry: A folder or an MLflow URL (default: the configured registry).
    """
    return operation_task("unpin", dataset, registry, reason)
