"""The ``train-mnist`` flow: download -> validate -> convert -> train -> evaluate -> gate -> publish.

Wiring only: every stage lives in ``tasks/``, the command line in ``flows/cli.py``. Run locally with
``python flows/train.py --help``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import Field, ValidationError

from tasks.conversion.convert import convert_task
from tasks.datasets import (
    DATASET_NAMES,
    DatasetConfigError,
    DatasetSpec,
    load_catalog,
    select_datasets,
    with_gate_overrides,
)
from tasks.download.fetch import RETRY_JITTER, download_task, retry_delays
from tasks.download.locations import SOURCE_PATTERN
from tasks.evaluation.evaluate import evaluate_task
from tasks.orchestration.fanout import CHILD_TIMEOUT_MINUTES, DATASET_DEPLOYMENT, child_outcome, run_child_task
from tasks.orchestration.triggers import DEBOUNCE_MINUTES, SKIPPED, trigger_guard_task
from tasks.orchestration.versions import run_version_name
from tasks.publishing.gate import gate_task
from tasks.publishing.promote import DEFAULT_TOLERANCE, PromotionPolicy
from tasks.publishing.publish import publish_task
from tasks.registry import Candidate
from tasks.reporting.expected_failures import quiet_expected_failures
from tasks.reporting.outcomes import (
    DatasetOutcome,
    NotPublished,
    emit_outcome_events,
    outcome_of,
    stopped_task,
    summarize_outcomes,
)
from tasks.results import Lineage, PreparedData
from tasks.settings import Settings, settings_problems
from tasks.training.recipes import DEFAULT_SEED, ModelKind, TrainConfig, applied_parameters, train_config_for
from tasks.training.train import train_task
from tasks.validation.validate import champion_profile_task, keep_report_task, validate_task
from tasks.vocabulary import StageFailure

SEED_MAX = 2**32 - 1  # numpy's (and so Keras') seed range
# Expected failures (each carries its stage) end a dataset's run Failed with one clean message; anything else is
# a bug and keeps its traceback.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (StageFailure,)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Text = Annotated[str, Field(min_length=1)]


def run_version() -> str:
    """This run's version name: its scheduled start (UTC) and the first hex digits of its flow run id."""
    from prefect.runtime import flow_run

    return run_version_name(flow_run.scheduled_start_time, flow_run.id)


def parent_run_name() -> str:
    """``<deployment>: <dataset> <version>`` (no deployment prefix for a local run)."""
    from prefect.runtime import deployment, flow_run

    name = f"{flow_run.parameters.get('dataset', 'all')} {run_version()}"
    return f"{deployment.name}: {name}" if deployment.name else name


def dataset_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    name = f"{params['spec'].name} {params['version']}"
    return f"{params['deployment']}: {name}" if params.get("deployment") else name


def prepare_data(spec: DatasetSpec, settings: Settings, run_dir: Path) -> PreparedData:
    """download -> validate -> convert for one dataset (the data stages; each is content-cached)."""
    download = download_task.with_options(retries=settings.download_retries, retry_delay_seconds=retry_delays(
        settings.download_retries, settings.download_retry_backoff_s), retry_jitter_factor=RETRY_JITTER)
    limits = {"timeout_s": settings.download_timeout_s, "deadline_s": settings.download_deadline_s,
              "max_bytes": settings.download_max_bytes, "total_deadline_s": settings.download_total_deadline_s}
    train_raw = download(spec, "train", settings.source, settings.raw_dir, **limits)
    test_raw = download(spec, "test", settings.source, settings.raw_dir, **limits)
    champion_profile = champion_profile_task(settings.registry_location, spec.name, run_dir)
    report = keep_report_task(validate_task(spec, train_raw.path, test_raw.path, run_dir, champion_profile), run_dir)
    return PreparedData(
        train_raw, test_raw, report,
        train_parquet=convert_task(train_raw, report.train.has_header, settings.parquet_dir, spec.name, "train"),
        test_parquet=convert_task(test_raw, report.test.has_header, settings.parquet_dir, spec.name, "test"))


@flow(name="train-dataset", flow_run_name=dataset_run_name)
def train_dataset(spec: DatasetSpec, settings: Settings, config: TrainConfig, version: str,
                  policy: PromotionPolicy | None = None, deployment: str | None = None) -> DatasetOutcome | State:
    """One dataset through every stage; stops (and publishes nothing) at the first stage that fails."""
    run_dir = settings.runs_dir / spec.name / version
    try:
        data = prepare_data(spec, settings, run_dir)
    except EXPECTED_FAILURES as exc:
        outcome = stopped_task(spec.name, version, exc, settings.registry_location)
        return Failed(message=outcome.state_message(), data=outcome)
    trained = train_task(data.train_parquet, spec.num_classes, config, run_dir, spec.name)
    evaluation = evaluate_task(trained.model, data.test_parquet, list(spec.class_names), run_dir, spec.name)
    decision = gate_task(evaluation.metrics, spec.gates, spec.name)
    parameters = applied_parameters({"dataset": spec.name, **config.model_dump()})
    report = data.report
    candidate = Candidate(
        dataset=spec.name, version=version, model_path=trained.model, metrics=evaluation.metrics, decision=decision,
        lineage=Lineage.of_run([data.train_raw, data.test_raw], report, parameters), test_parquet=data.test_parquet,
        predictions=evaluation.predictions, probabilities=evaluation.probabilities, parameters=parameters,
        drift=report.drift_numbers(),
        files={path.name: path for path in (trained.curves, report.report_path, report.profile_path) if path})
    outcome = publish_task(settings.registry_location, candidate, policy=policy, validation_report=report.html_path)
    return outcome if outcome.published or outcome.held else Failed(message=outcome.state_message(), data=outcome)


@flow(name="train-mnist", flow_run_name=parent_run_name)
def train_mnist(
    dataset: Annotated[str, Field(pattern=DATASET_NAMES)] = "all",
    model: ModelKind | None = None,
    epochs: Annotated[int, Field(gt=0, le=10_000)] | None = None,
    source: Annotated[str, Field(pattern=SOURCE_PATTERN, min_length=1)] | None = None,
    registry: Text | None = None,
    data_dir: Text | None = None,
    datasets_file: Text | None = None,
    min_accuracy: Fraction | None = None,
    min_class_recall: Fraction | None = None,
    train_rows: Annotated[int, Field(gt=0)] | None = None,
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = DEFAULT_SEED,
    promotion_tolerance: Fraction = DEFAULT_TOLERANCE,
    fan_out: bool = False,
    child_timeout_minutes: Annotated[float, Field(gt=0)] = CHILD_TIMEOUT_MINUTES,
    triggered_by: Text | None = None,
    trigger_debounce_minutes: Annotated[float, Field(ge=0)] = DEBOUNCE_MINUTES,
) -> dict[str, str] | State:
    """Retrain and publish each requested dataset (``all``, one name, or names separated by commas).

    Returns {dataset: published version}; ends Failed if any dataset was not published, after trying all
    of them. The run's ``train-mnist-summary`` artifact shows each dataset's outcome and links its run.

    Args:
        dataset: mnist, fashion-mnist, a name from the datasets file, several separated by commas, or all.
        model: Model architecture (default: each dataset's recipe, see tasks/datasets.toml).
        epochs: Training epochs (default: the recipe's, or the model's default).
        source: Mirror to download from: a directory, file:// or http(s):// URL (default: the bundled
            data/mirror; env TRAIN_MNIST_SOURCE).
        registry: Model registry: a folder (default <data-dir>/registry) or an MLflow tracking server URL
            http(s)://host:port (env TRAIN_MNIST_REGISTRY).
        data_dir: Folder for raw files, Parquet and run reports (default ./data; env TRAIN_MNIST_DATA_DIR).
        datasets_file: TOML file with more dataset definitions (README: Your own datasets).
        min_accuracy: Override every dataset's accuracy gate (0..1).
        min_class_recall: Override every dataset's per-class recall floor (0..1).
        train_rows: Train on the first N rows only (quick runs).
        seed: Seed of weight initialisation, shuffling, the validation hold-out and augmentation; the same
            seed and data give the same model (0..4294967295).
        promotion_tolerance: Largest accuracy drop accepted against the production model.
        fan_out: Run each dataset as its own flow run of the train-mnist/dataset deployment, on whichever
            worker is free, and wait for all of them (default: one after the other, in this process).
        child_timeout_minutes: With fan_out, how long to wait for each dataset's run; one still not finished
            is cancelled and named in the failure (with no worker on the train queue it would wait forever).
        triggered_by: Set by an event trigger (the event's name): the run first checks that no other run is
            training the dataset and that no triggered run of it started within trigger_debounce_minutes, and
            ends Skipped if one is or did.
        trigger_debounce_minutes: With triggered_by, the least time between two triggered runs of a dataset.
    """
    from prefect.runtime import deployment, flow_run

    quiet_expected_failures(EXPECTED_FAILURES)
    overrides = {"source": source, "registry": registry, "data_dir": data_dir, "datasets_file": datasets_file}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        specs = select_datasets(load_catalog(settings.datasets_file), [n.strip() for n in dataset.split(",")])
    except (DatasetConfigError, ValidationError) as exc:
        message = settings_problems(exc)
        get_run_logger().error("%s", message)
        return Failed(message=message, data=NotPublished(message))
    specs = [with_gate_overrides(s, min_accuracy, min_class_recall) for s in specs]
    if triggered_by and (skip := trigger_guard_task([s.name for s in specs], trigger_debounce_minutes)):
        get_run_logger().info("%s: not training now: %s", triggered_by, skip)
        return Completed(name=SKIPPED, message=skip)
    version = run_version()
    if fan_out:
        children = [run_child_task.submit(DATASET_DEPLOYMENT, spec.name, dict(flow_run.parameters),
                                          child_timeout_minutes) for spec in specs]
        return summarize_outcomes([child_outcome(child.result()) for child in children], version)
    states = {spec.name: train_dataset(spec, settings, train_config_for(spec.recipe, model, epochs, seed, train_rows),
                                       version, PromotionPolicy(tolerance=promotion_tolerance), deployment.name,
                                       return_state=True)
              for spec in specs}
    outcomes = [outcome_of(name, version, state) for name, state in states.items()]
    emit_outcome_events(outcomes)
    return summarize_outcomes(outcomes, version)


if __name__ == "__main__":
    # ``python flows/train.py`` is ``train-mnist``: the command line (flows/cli.py) imports this module, so it
    # runs in place of this script rather than being imported by it (no second copy of the flows, no cycle).
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "flows.cli", *sys.argv[1:]], {**os.environ, "PYTHONPATH": path})
