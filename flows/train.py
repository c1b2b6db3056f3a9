"""The ``train-mnist`` flow: download -> validate -> convert -> train -> evaluate -> gate -> publish.

Run locally with ``python flows/train.py --help``. Wiring only: every stage lives in ``tasks/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Annotated, Any, get_args

from prefect import flow, get_run_logger
from prefect.states import Failed, State
from pydantic import Field

from tasks.convert import convert_task
from tasks.datasets import DatasetConfigError, DatasetSpec, Gates, ModelKind, load_catalog, select_datasets
from tasks.download import (
    ChecksumMismatch,
    DownloadError,
    DownloadRefused,
    SourceNotFound,
    download_task,
    retry_delays,
)
from tasks.evaluate import evaluate_task
from tasks.fanout import DATASET_DEPLOYMENT, ChildRun, run_child_task
from tasks.gate import gate_task
from tasks.locations import SOURCE_PATTERN, LocationError
from tasks.outcome import (
    DatasetOutcome,
    NotPublished,
    outcome_line,
    quiet_expected_failures,
    run_failure_message,
    run_summary_markdown,
)
from tasks.promote import DEFAULT_TOLERANCE, PromotionPolicy
from tasks.publish import GateFailed, publish_task, run_version_name
from tasks.registry import PROFILE_FILE, Candidate, ChampionUnreadable, open_registry
from tasks.settings import Settings
from tasks.train import DEFAULT_SEED, TrainConfig, applied_parameters, train_config_for, train_task
from tasks.validate import DataValidationError, report_in_run_dir, validate_task
from tasks.validation_report import REPORT_NAME, write_validation_html

SEED_MAX = 2**32 - 1  # numpy's (and so Keras') seed range
DATASET_NAMES = r"^\s*[a-z0-9][a-z0-9_-]*\s*(,\s*[a-z0-9][a-z0-9_-]*\s*)*$"
# Expected failures end a dataset's run Failed with one clean message; anything else is a bug and keeps its traceback.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    DownloadError, ChecksumMismatch, SourceNotFound, DownloadRefused, LocationError, DataValidationError, GateFailed,
    ChampionUnreadable)

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


@flow(name="train-dataset", flow_run_name=dataset_run_name)
def train_dataset(spec: DatasetSpec, settings: Settings, config: TrainConfig, version: str,
                  policy: PromotionPolicy | None = None, deployment: str | None = None) -> DatasetOutcome | State:
    """One dataset through every stage; stops (and publishes nothing) at the first stage that fails."""
    run_dir = settings.runs_dir / spec.name / version
    download = download_task.with_options(retries=settings.download_retries, retry_delay_seconds=retry_delays(
        settings.download_retries, settings.download_retry_backoff_s))
    try:
        train_raw = download(spec, "train", settings.source, settings.raw_dir, settings.download_timeout_s,
                             settings.download_deadline_s, settings.download_max_bytes)
        test_raw = download(spec, "test", settings.source, settings.raw_dir, settings.download_timeout_s,
                            settings.download_deadline_s, settings.download_max_bytes)
        champion_profile = open_registry(settings.registry_location).champion_profile(spec.name)
        report = report_in_run_dir(validate_task(spec, train_raw.path, test_raw.path, run_dir, champion_profile),
                                   run_dir)
    except EXPECTED_FAILURES as exc:
        return stopped(spec.name, version, exc, settings.registry_location)
    train_parquet = convert_task(train_raw, report.has_header["train"], settings.parquet_dir, spec.name, "train")
    test_parquet = convert_task(test_raw, report.has_header["test"], settings.parquet_dir, spec.name, "test")
    trained = train_task(train_parquet, spec.num_classes, config, run_dir, spec.name)
    evaluation = evaluate_task(trained.model, test_parquet, list(spec.class_names), run_dir, spec.name)
    decision = gate_task(evaluation.metrics_path, spec.gates, spec.name)
    parameters = applied_parameters({"dataset": spec.name, **config.model_dump()})
    lineage = {
        "data": {raw.path.parent.name: {**raw.lineage(), "rows": report.drift.get(raw.path.parent.name, {}).get("rows")}
                 for raw in (train_raw, test_raw)},
        "parameters": parameters,
        "validation_report": str(report.report_path),
    }
    candidate = Candidate(
        dataset=spec.name, version=version, model_path=trained.model, metrics=evaluation.metrics, decision=decision,
        lineage=lineage, test_parquet=test_parquet, predictions_path=evaluation.predictions_path,
        files={trained.curves.name: trained.curves, report.report_path.name: report.report_path,
               **({PROFILE_FILE: report.profile_path} if report.profile_path else {})},
        parameters=parameters)
    outcome = publish_task(settings.registry_location, candidate, policy=policy,
                           validation_report=write_validation_html(report.report_path))
    return outcome if outcome.published else Failed(message=outcome.state_message(), data=outcome)


def stopped(dataset: str, version: str, exc: BaseException, registry: str) -> State:
    """A dataset stopped by an expected failure before training: logged once, added to the dataset's history,
    and a Failed state with the outcome as its data."""
    get_run_logger().error("%s", exc)
    report = getattr(exc, "report_path", None)
    html = report.with_name(REPORT_NAME) if report is not None and report.with_name(REPORT_NAME).is_file() else None
    outcome = DatasetOutcome.from_exception(dataset, version, exc, validation_report=str(html) if html else None)
    stage = "validate" if isinstance(exc, DataValidationError) else "download"
    try:
        open_registry(registry).record_failure(dataset, version, stage, outcome.headline, report)
    except Exception as history_exc:  # noqa: BLE001 - the run's outcome stands; its history line is a view
        get_run_logger().warning("%s: history of run %s not recorded: %s", dataset, version, history_exc)
    return Failed(message=outcome.state_message(), data=outcome)


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
    """
    from prefect.runtime import deployment, flow_run

    quiet_expected_failures(EXPECTED_FAILURES)
    overrides = {"source": source, "registry": registry, "data_dir": data_dir, "datasets_file": datasets_file}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    try:
        specs = select_datasets(load_catalog(settings.datasets_file), [n.strip() for n in dataset.split(",")])
    except DatasetConfigError as exc:
        get_run_logger().error("%s", exc)
        return Failed(message=f"{exc}", data=NotPublished(str(exc)))
    specs = [with_gate_overrides(s, min_accuracy, min_class_recall) for s in specs]
    version = run_version()
    if fan_out:
        children = [run_child_task.submit(DATASET_DEPLOYMENT, spec.name, dict(flow_run.parameters))
                    for spec in specs]
        return summarize_outcomes([child_outcome(child.result()) for child in children], version)
    states = {spec.name: train_dataset(spec, settings, train_config_for(spec.recipe, model, epochs, seed, train_rows),
                                       version, PromotionPolicy(tolerance=promotion_tolerance), deployment.name,
                                       return_state=True)
              for spec in specs}
    return summarize_outcomes([outcome_of(name, version, state) for name, state in states.items()], version)


def with_gate_overrides(spec: DatasetSpec, min_accuracy: float | None, min_class_recall: float | None) -> DatasetSpec:
    changes = {k: v for k, v in (("min_accuracy", min_accuracy), ("min_class_recall", min_class_recall)) if v is not None}
    return spec.model_copy(update={"gates": Gates(**{**spec.gates.model_dump(), **changes})}) if changes else spec


def outcome_of(name: str, version: str, state: State) -> DatasetOutcome:
    """A dataset run's outcome: its returned value, the outcome its Failed state carries, or the bug that stopped it."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, DatasetOutcome):
        outcome = result
    else:
        exc = result if isinstance(result, BaseException) else RuntimeError(state.message or state.name)
        outcome = DatasetOutcome(dataset=name, version=version, published=False,
                                 headline=f"{name}: stopped by an unexpected error (traceback in the {name} run's log)",
                                 reasons=[f"{type(exc).__name__}: {exc}"])
    run_id = state.state_details.flow_run_id
    return outcome.model_copy(update={"flow_run_id": str(run_id) if run_id else None})


def child_outcome(child: ChildRun) -> DatasetOutcome:
    """A fanned-out dataset's outcome, as its child run's final state tells it."""
    lines = [line for line in child.message.splitlines() if line.strip()]
    headline = f"{child.dataset}: child run {child.name} {child.state}" + (f": {lines[0]}" if lines else "")
    return DatasetOutcome(dataset=child.dataset, version=child.version, published=child.completed,
                          headline=headline, reasons=[line.lstrip("- ") for line in lines[1:]],
                          flow_run_id=str(child.flow_run_id))


def summarize_outcomes(outcomes: list[DatasetOutcome], version: str) -> dict[str, str] | State:
    """The parent run's summary artifact; the published versions, or a Failed state naming each dataset and why."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.utilities.urls import url_for

    urls = {o.dataset: url_for("flow-run", obj_id=o.flow_run_id) if o.flow_run_id else None for o in outcomes}
    published = sum(o.published for o in outcomes)
    for outcome in outcomes:  # the parent's own log says what happened, without repeating the reasons
        log = get_run_logger().info if outcome.published else get_run_logger().warning
        log("%s", outcome_line(outcome, urls[outcome.dataset]))
    try:
        create_markdown_artifact(key="train-mnist-summary", markdown=run_summary_markdown(outcomes, urls),
                                 description=f"train-mnist {version}: {published} of {len(outcomes)} published")
    except Exception as exc:  # noqa: BLE001 - a view; the outcome must not depend on it
        get_run_logger().warning("could not create the run's summary artifact: %s: %s", type(exc).__name__, exc)
    if published < len(outcomes):
        message = run_failure_message(outcomes)
        return Failed(message=message, data=NotPublished(message))
    return {o.dataset: o.version for o in outcomes}


def parameter_help() -> dict[str, str]:
    """The flow's own parameter descriptions (its docstring, as the Prefect UI's run form shows them)."""
    from prefect.utilities.callables import parameter_schema

    properties = parameter_schema(train_mnist.fn).properties
    return {name: f"{p.get('description', '')} (default {p['default']})" if p.get("default") is not None
            else p.get("description", "") for name, p in properties.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flow's parameters as options, described as the flow describes them."""
    parser = argparse.ArgumentParser(
        prog="python flows/train.py",
        description="Download, validate, convert, train, evaluate, gate and publish MNIST-like datasets.",
        epilog="`train-mnist predict --help`: score a CSV with a dataset's production model.",
    )
    kinds: dict[str, dict[str, Any]] = {
        "model": {"choices": list(get_args(ModelKind))}, "epochs": {"type": int}, "min_accuracy": {"type": float},
        "min_class_recall": {"type": float}, "train_rows": {"type": int}, "seed": {"type": int},
        "promotion_tolerance": {"type": float}, "fan_out": {"action": "store_true", "default": None}}
    for name, help_text in parameter_help().items():
        parser.add_argument(f"--{name.replace('_', '-')}", help=help_text, **kinds.get(name, {}))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        from tasks.predict import main as predict_main

        return predict_main(argv[1:])
    args = parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors in the log
    params: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:  # the flow signature's domains, checked before any work (as the server does for deployments)
        train_mnist.validate_parameters(params)
    except Exception as exc:  # noqa: BLE001 - Prefect's ParameterTypeError names the field and the reason
        print(f"train-mnist: invalid parameters: {exc}", file=sys.stderr)
        return 2
    state = train_mnist(**params, return_state=True)
    if state.is_completed():
        for name, version in state.result().items():
            print(f"published {name} {version}")
        return 0
    print(f"train-mnist {state.name}: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
