"""Serve the train-mnist deployments from this one process, no work pool: ``python deployments/serve_deployments.py``.

The same deployments as ``deployments/prefect.yaml`` (the work-pool path), defined once more in Python:

* ``train-mnist/nightly``: every dataset with its own recipe's model, every night at 02:00 UTC; at most one run at a
  time, a run that collides with a running one waits for it (ENQUEUE).
* ``train-mnist/dataset``: one dataset's run; a nightly run with ``fan_out=true`` creates one per dataset.
  ``serve.py`` keeps ``nightly`` sequential: on one machine the datasets would only share its cores.
* ``train-mnist/smoke``: one epoch on 5,000 MNIST rows with low gates, on demand, published to a
  separate registry (``data/smoke-registry``) so it never moves a production pointer.
* ``train-mnist/dataset`` also starts on ``train-mnist.data.changed`` and ``train-mnist.drift.detected`` events for
  the dataset they name (debounced by the run's guard, ``tasks.orchestration.triggers``).
* ``data-watch/train-mnist``: every 10 minutes, emits ``train-mnist.data.changed`` for each dataset whose files at the
  source changed since its last look (``flows/data_watch.py``).
* ``rollback/train-mnist``, ``pin/train-mnist``, ``unpin/train-mnist``: the operator's actions
  (``flows/operations.py``), on demand from the UI's run form.

Runs execute in child processes of this one; stopping it (Ctrl-C) pauses the deployments' schedules.
Parameters given to ``prefect deployment run ... --param k=v`` are checked against the flow's
signature by the server before a run is created.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval

from flows.data_watch import data_watch
from flows.operations import pin_flow, rollback_flow, unpin_flow
from flows.train import train_mnist
from tasks.orchestration.fanout import DATASET_DEPLOYMENT
from tasks.orchestration.triggers import DEBOUNCE_MINUTES, retrain_trigger
from tasks.settings import PROJECT_ROOT

NIGHTLY_CRON = "0 2 * * *"
DATA_WATCH_MINUTES = 10.0
# Prefect names a deployment <flow>/<name>: the operator's flows are rollback, pin and unpin.
OPERATIONS_DEPLOYMENT = "train-mnist"
TIMEZONE = "UTC"
TAGS = ["train-mnist"]
NIGHTLY_PARAMETERS: dict[str, Any] = {"dataset": "all"}  # model: each dataset's own recipe
SMOKE_PARAMETERS: dict[str, Any] = {
    "dataset": "mnist", "model": "mlp", "epochs": 1, "train_rows": 5000,
    "min_accuracy": 0.5, "min_class_recall": 0.0,
}
SMOKE_REGISTRY = PROJECT_ROOT / "data" / "smoke-registry"


def nightly() -> RunnerDeployment:
    """Every dataset, every night; a second run waits until the first has finished."""
    return train_mnist.to_deployment(
        name="nightly",
        description="Retrain and publish every dataset, nightly at 02:00 UTC; one run at a time.",
        schedules=[Cron(NIGHTLY_CRON, timezone=TIMEZONE, slug="nightly-0200-utc")],
        # ENQUEUE, not CANCEL_NEW: a manual run started while the nightly one trains (say with other
        # parameters) must not be dropped silently; it waits and then runs.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters=NIGHTLY_PARAMETERS,
        tags=TAGS,
    )


def dataset(debounce_minutes: float = DEBOUNCE_MINUTES) -> RunnerDeployment:
    """One dataset's run: the child that a fanned-out nightly run creates for each dataset, and the run that new
    data or live drift starts (its event trigger, debounced by the run's guard)."""
    return train_mnist.to_deployment(
        name=DATASET_DEPLOYMENT.split("/", 1)[1],
        description="One dataset's run, created by a fanned-out nightly run for each of its datasets, or by new "
                    "data or drift.",
        parameters={"fan_out": False},
        triggers=[retrain_trigger(debounce_minutes)],
        tags=TAGS,
    )


def data_watch_deployment(every_minutes: float = DATA_WATCH_MINUTES) -> RunnerDeployment:
    """The data-arrival check on a short interval; a check still running when the next is due is dropped."""
    return data_watch.to_deployment(
        name=OPERATIONS_DEPLOYMENT,
        description="Look for changed files at the source; emit train-mnist.data.changed for each dataset that "
                    "has some.",
        schedules=[Interval(timedelta(minutes=every_minutes), slug="data-watch")],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        tags=TAGS,
    )


def smoke() -> RunnerDeployment:
    """A quick end-to-end check of the pipeline (about a minute), publishing to a registry of its own."""
    return train_mnist.to_deployment(
        name="smoke",
        description="One epoch on 5,000 MNIST rows with low gates, into data/smoke-registry; on demand.",
        parameters={**SMOKE_PARAMETERS, "registry": str(SMOKE_REGISTRY)},
        tags=TAGS,
    )


def operations() -> list[RunnerDeployment]:
    """rollback/train-mnist, pin/train-mnist, unpin/train-mnist: the operator's actions, run from the UI's form."""
    return [flow.to_deployment(name=OPERATIONS_DEPLOYMENT, description=(flow.fn.__doc__ or "").splitlines()[0],
                               tags=TAGS) for flow in (rollback_flow, pin_flow, unpin_flow)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deployments/serve_deployments.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None,
                        help="most flow runs this process executes at once (default: no limit)")
    parser.add_argument("--data-watch-minutes", type=float, default=DATA_WATCH_MINUTES,
                        help=f"how often data-watch looks at the source (default {DATA_WATCH_MINUTES:g})")
    parser.add_argument("--trigger-debounce-minutes", type=float, default=DEBOUNCE_MINUTES,
                        help="least time between two event-triggered runs of a dataset (default "
                             f"{DEBOUNCE_MINUTES:g})")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors in the log
    serve(nightly(), dataset(args.trigger_debounce_minutes), smoke(), data_watch_deployment(args.data_watch_minutes),
          *operations(), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
