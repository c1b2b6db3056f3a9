"""The data-arrival check: ``data-watch/train-mnist`` runs every few minutes and emits
``train-mnist.data.changed`` for each dataset whose files at the source changed since its last look.

The ``train-mnist/dataset`` deployment's trigger starts that dataset's run on the event (debounced, never beside a
running night for it; ``tasks.orchestration.triggers``), so new data is trained on within minutes instead of at
02:00. Wiring only: the work is ``tasks.download.watch``.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from tasks.datasets import DATASET_NAMES, load_catalog, select_datasets
from tasks.download.watch import DataCheck, check_source_task
from tasks.settings import Settings


@flow(name="data-watch", flow_run_name="data-watch {dataset}")
def data_watch(dataset: Annotated[str, Field(pattern=DATASET_NAMES)] = "all", source: str | None = None,
               datasets_file: str | None = None) -> list[DataCheck]:
    """Look for changed files at the source; emit ``train-mnist.data.changed`` for each dataset that has some.

    Args:
        dataset: all, one name, or several separated by commas.
        source: The mirror to watch (default: the configured source, env TRAIN_MNIST_SOURCE).
        datasets_file: TOML file with more dataset definitions.
    """
    overrides = {"source": source, "datasets_file": datasets_file}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    specs = select_datasets(load_catalog(settings.datasets_file), [n.strip() for n in dataset.split(",")])
    checks = [check_source_task(spec, settings.source) for spec in specs]
    for check in checks:
        get_run_logger().info("%s at %s: %s", check.dataset, check.source,
                              "first look, recorded" if check.first_check else
                              f"changed: {', '.join(check.changed)}" if check.changed else "unchanged")
    return checks
