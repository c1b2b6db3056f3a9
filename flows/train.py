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
from tasks.datasets import DatasetSpec, Gates, ModelKind, load_catalog, select_datasets
from tasks.download import ChecksumMismatch, DownloadError, SourceNotFound, download_task
from tasks.evaluate import evaluate_task
from tasks.gate import gate_task
from tasks.outcome import (
    DatasetOutcome,
    NotPublished,
    outcome_line,
    quiet_expected_failures,
    run_failure_message,
    run_summary_markdown,
)
from tasks.promote import PromotionPolicy
from tasks.publish import ChampionUnreadable, GateFailed, new_version_name, publish_task
from tasks.settings import Settings
from tasks.train import TrainConfig, applied_parameters, train_config_for, train_task
from tasks.validate import DataValidationError, report_in_run_dir, validate_task
from tasks.validation_report import REPORT_NAME, write_validation_html

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# Expected failures end a dataset's run Failed with one clean message; anything else is a bug and keeps its traceback.
EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    DownloadError, ChecksumMismatch, SourceNotFound, DataValidationError, GateFailed, ChampionUnreadable)


def run_version() -> str:
    """This run's version name: its scheduled start (UTC) and the first hex digits of its flow run id."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return new_version_name(flow_run.scheduled_start_time, run_id.replace("-", "")[:6] if run_id else None)


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
    download = download_task.with_options(retries=settings.download_retries, retry_delay_seconds=[
        settings.download_retry_backoff_s * 2**i for i in range(settings.download_retries)])
    try:
        train_raw = download(spec, "train", settings.source, settings.raw_dir, settings.download_timeout_s)
        test_raw = download(spec, "test", settings.source, settings.raw_dir, settings.download_timeout_s)
        report = report_in_run_dir(validate_task(spec, train_raw.path, test_raw.path, run_dir), run_dir)
    except EXPECTED_FAILURES as exc:
        return stopped(spec.name, version, exc)
    train_parquet = convert_task(train_raw, report.has_header["train"], settings.parquet_dir, spec.name, "train")
    test_parquet = convert_task(test_raw, report.has_header["test"], settings.parquet_dir, spec.name, "test")
    model_path = train_task(train_parquet, spec.num_classes, config, run_dir, spec.name)
    metrics_path = evaluate_task(model_path, test_parquet, list(spec.class_names), run_dir, spec.name)
    decision = gate_task(metrics_path, spec.gates, spec.name)
    lineage = {
        "data": {raw.path.parent.name: {"location": raw.location, "sha256": raw.sha256, "bytes": raw.size}
                 for raw in (train_raw, test_raw)},
        "parameters": applied_parameters({"dataset": spec.name, **config.model_dump()}),
        "validation_report": str(report.report_path),
    }
    outcome = publish_task(settings.registry_dir, spec.name, version, model_path, metrics_path, decision, lineage,
                           {"training_curves.png": run_dir / "training_curves.png"}, test_parquet=test_parquet,
                           predictions_path=run_dir / "predictions.npy", policy=policy,
                           validation_report=write_validation_html(report.report_path))
    return outcome if outcome.published else Failed(message=outcome.state_message(), data=outcome)


def stopped(dataset: str, version: str, exc: BaseException) -> State:
    """A dataset stopped by an expected failure: logged once, and a Failed state with the outcome as its data."""
    get_run_logger().error("%s", exc)
    report = getattr(exc, "report_path", None)
    html = report.with_name(REPORT_NAME) if report is not None and report.with_name(REPORT_NAME).is_file() else None
    outcome = DatasetOutcome.from_exception(dataset, version, exc, validation_report=str(html) if html else None)
    return Failed(message=outcome.state_message(), data=outcome)


@flow(name="train-mnist", flow_run_name=parent_run_name)
def train_mnist(
    dataset: str = "all",
    model: ModelKind | None = None,
    epochs: Annotated[int, Field(gt=0)] | None = None,
    source: str | None = None,
    registry: str | None = None,
    data_dir: str | None = None,
    datasets_file: str | None = None,
    min_accuracy: Fraction | None = None,
    min_class_recall: Fraction | None = None,
    train_rows: Annotated[int, Field(gt=0)] | None = None,
    seed: int = 42,
    promotion_tolerance: Fraction = 0.005,
) -> dict[str, str] | State:
    """Retrain and publish each requested dataset (``all``, one name, or names separated by commas).

    Returns {dataset: published version}; ends Failed if any dataset was not published, after trying all
    of them. The run's ``train-mnist-summary`` artifact shows each dataset's outcome and links its run.
    """
    from prefect.runtime import deployment

    quiet_expected_failures(EXPECTED_FAILURES)
    overrides = {"source": source, "registry": registry, "data_dir": data_dir, "datasets_file": datasets_file}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    specs = select_datasets(load_catalog(settings.datasets_file), [n.strip() for n in dataset.split(",")])
    specs = [with_gate_overrides(s, min_accuracy, min_class_recall) for s in specs]
    version = run_version()
    states = {spec.name: train_dataset(spec, settings, train_config_for(spec.recipe, model, epochs, seed, train_rows),
                                       version, PromotionPolicy(tolerance=promotion_tolerance), deployment.name,
                                       return_state=True)
              for spec in specs}
    return summarize(states, version)


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


def summarize(states: dict[str, State], version: str) -> dict[str, str] | State:
    """The parent run's summary artifact; the published versions, or a Failed state naming each dataset and why."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.utilities.urls import url_for

    outcomes = [outcome_of(name, version, state) for name, state in states.items()]
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python flows/train.py",
        description="Download, validate, convert, train, evaluate, gate and publish MNIST-like datasets.",
    )
    parser.add_argument("--dataset", default="all", help="mnist, fashion-mnist, a name from --datasets-file, "
                        "several separated by commas, or all (default)")
    parser.add_argument("--model", choices=list(get_args(ModelKind)),
                        help="model architecture (default: each dataset's recipe, see tasks/datasets.toml)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the recipe's, or the model's default)")
    parser.add_argument("--source", help="mirror: directory, file:// or http(s):// URL (default: bundled data/mirror; "
                        "env TRAIN_MNIST_SOURCE)")
    parser.add_argument("--registry", help="model registry folder (default <data-dir>/registry; env TRAIN_MNIST_REGISTRY)")
    parser.add_argument("--data-dir", help="raw/parquet/runs folder (default ./data; env TRAIN_MNIST_DATA_DIR)")
    parser.add_argument("--datasets-file", help="TOML file with more dataset definitions (see README)")
    parser.add_argument("--min-accuracy", type=float, help="override every dataset's accuracy gate")
    parser.add_argument("--min-class-recall", type=float, help="override every dataset's per-class recall floor")
    parser.add_argument("--train-rows", type=int, help="train on the first N rows only (quick runs)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of weight initialisation, shuffling, the validation hold-out and augmentation: "
                             "the same seed and data give the same model (default 42)")
    parser.add_argument("--promotion-tolerance", type=float,
                        help="largest accuracy drop accepted against the production model (default 0.005)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry errors in the log
    params: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    state = train_mnist(**params, return_state=True)
    if state.is_completed():
        for name, version in state.result().items():
            print(f"published {name} {version}")
        return 0
    print(f"train-mnist {state.name}: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
