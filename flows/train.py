"""The ``train-mnist`` flow: download -> validate -> convert -> train -> evaluate -> gate -> publish.

Run locally with ``python flows/train.py --help``. Wiring only: every stage lives in ``tasks/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, get_args

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import State
from pydantic import Field

from tasks.convert import convert_task
from tasks.datasets import DatasetSpec, Gates, ModelKind, load_catalog, select_datasets
from tasks.download import download_task
from tasks.evaluate import evaluate_task, read_metrics
from tasks.fanout import DATASET_DEPLOYMENT, ChildRun, run_child_task
from tasks.gate import gate_task
from tasks.locations import SOURCE_PATTERN
from tasks.promote import PromotionPolicy
from tasks.publish import new_version_name, publish_task
from tasks.registry import PROFILE_FILE, Candidate, Published, open_registry
from tasks.settings import Settings
from tasks.train import TrainConfig, train_config_for, train_task
from tasks.validate import report_in_run_dir, validate_task

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
SEED_MAX = 2**32 - 1  # numpy's (and so Keras') seed range
DatasetNames = Annotated[str, Field(pattern=r"^\s*[a-z0-9][a-z0-9_-]*\s*(,\s*[a-z0-9][a-z0-9_-]*\s*)*$")]
NonEmpty = Annotated[str, Field(min_length=1)]


@flow(name="train-dataset", flow_run_name="{spec.name}")
def train_dataset(spec: DatasetSpec, settings: Settings, config: TrainConfig, version: str,
                  policy: PromotionPolicy | None = None) -> Published:
    """One dataset through every stage; fails (and publishes nothing) at the first stage that does."""
    run_dir = settings.runs_dir / spec.name / version
    download = download_task.with_options(retries=settings.download_retries, retry_delay_seconds=[
        settings.download_retry_backoff_s * 2**i for i in range(settings.download_retries)])
    train_raw = download(spec, "train", settings.source, settings.raw_dir, settings.download_timeout_s)
    test_raw = download(spec, "test", settings.source, settings.raw_dir, settings.download_timeout_s)
    champion_profile = open_registry(settings.registry_location).champion_profile(spec.name)
    report = report_in_run_dir(validate_task(spec, train_raw.path, test_raw.path, run_dir, champion_profile), run_dir)
    train_parquet = convert_task(train_raw, report.has_header["train"], settings.parquet_dir, spec.name, "train")
    test_parquet = convert_task(test_raw, report.has_header["test"], settings.parquet_dir, spec.name, "test")
    model_path = train_task(train_parquet, spec.num_classes, config, run_dir, spec.name)
    metrics_path = evaluate_task(model_path, test_parquet, list(spec.class_names), run_dir, spec.name)
    decision = gate_task(metrics_path, spec.gates, spec.name)
    lineage = {
        "data": {raw.path.parent.name: {"location": raw.location, "sha256": raw.sha256, "bytes": raw.size,
                                         "rows": report.drift.get(raw.path.parent.name, {}).get("rows")}
                 for raw in (train_raw, test_raw)},
        "parameters": {"dataset": spec.name, **config.model_dump()},
        "validation_report": str(report.report_path),
    }
    candidate = Candidate(dataset=spec.name, version=version, model_path=model_path,
                          metrics=read_metrics(metrics_path), decision=decision, lineage=lineage,
                          test_parquet=test_parquet, predictions_path=run_dir / "predictions.npy",
                          files={"training_curves.png": run_dir / "training_curves.png",
                                 "validation.json": report.report_path,
                                 **({PROFILE_FILE: report.profile_path} if report.profile_path else {})},
                          parameters=lineage["parameters"])
    return publish_task(settings.registry_location, candidate, policy=policy)


@flow(name="train-mnist", flow_run_name="train-mnist-{dataset}")
def train_mnist(
    dataset: DatasetNames = "all",
    model: ModelKind | None = None,
    epochs: Annotated[int, Field(gt=0, le=10_000)] | None = None,
    source: Annotated[str, Field(pattern=SOURCE_PATTERN, min_length=1)] | None = None,
    registry: NonEmpty | None = None,
    data_dir: NonEmpty | None = None,
    datasets_file: NonEmpty | None = None,
    min_accuracy: Fraction | None = None,
    min_class_recall: Fraction | None = None,
    train_rows: Annotated[int, Field(gt=0)] | None = None,
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] = 42,
    promotion_tolerance: Fraction = 0.005,
    fan_out: bool = False,
) -> dict[str, str]:
    """Retrain and publish each requested dataset (``all``, one name, or names separated by commas).

    Returns {dataset: published version}; fails if any dataset failed, after trying all of them. With
    ``fan_out`` each dataset runs as its own flow run of the ``train-mnist/dataset`` deployment, on whichever
    worker of the pool is free, and this run waits for all of them.
    """
    overrides = {"source": source, "registry": registry, "data_dir": data_dir, "datasets_file": datasets_file}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    specs = select_datasets(load_catalog(settings.datasets_file), [n.strip() for n in dataset.split(",")])
    specs = [with_gate_overrides(s, min_accuracy, min_class_recall) for s in specs]
    version = new_version_name(datetime.now(UTC))
    if fan_out:
        children = [run_child_task.submit(DATASET_DEPLOYMENT, spec.name, dict(flow_run.parameters), version)
                    for spec in specs]
        return summarize_children([child.result() for child in children])
    states = {spec.name: train_dataset(spec, settings, train_config_for(spec.recipe, model, epochs, seed, train_rows),
                                       version, PromotionPolicy(tolerance=promotion_tolerance), return_state=True)
              for spec in specs}
    return summarize(states)


def with_gate_overrides(spec: DatasetSpec, min_accuracy: float | None, min_class_recall: float | None) -> DatasetSpec:
    changes = {k: v for k, v in (("min_accuracy", min_accuracy), ("min_class_recall", min_class_recall)) if v is not None}
    return spec.model_copy(update={"gates": Gates(**{**spec.gates.model_dump(), **changes})}) if changes else spec


def summarize(states: dict[str, State]) -> dict[str, str]:
    """Versions of the published datasets, or an error naming each dataset that failed and why."""
    failed = {name: state for name, state in states.items() if not state.is_completed()}
    if failed:
        details = []
        for name, state in failed.items():
            try:
                state.result()
            except Exception as exc:  # noqa: BLE001 - we report it
                details.append(str(exc) if name in str(exc) else f"{name}: {exc}")
        raise RuntimeError(f"{len(failed)} of {len(states)} dataset(s) not published:\n" + "\n".join(details))
    return {name: state.result().version for name, state in states.items()}


def summarize_children(children: list[ChildRun]) -> dict[str, str]:
    """The children's datasets, or an error naming each child run that did not complete and why."""
    failed = [child for child in children if not child.completed]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(children)} dataset run(s) not published:\n" + "\n".join(
            f"{child.dataset}: child run {child.name} ({child.flow_run_id}) {child.state}: {child.message}"
            for child in failed))
    return {child.dataset: child.name for child in children}


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
    parser.add_argument("--registry", help="model registry: a folder (default <data-dir>/registry) or an MLflow "
                        "tracking server URL http(s)://host:port; env TRAIN_MNIST_REGISTRY")
    parser.add_argument("--data-dir", help="raw/parquet/runs folder (default ./data; env TRAIN_MNIST_DATA_DIR)")
    parser.add_argument("--datasets-file", help="TOML file with more dataset definitions (see README)")
    parser.add_argument("--min-accuracy", type=float, help="override every dataset's accuracy gate")
    parser.add_argument("--min-class-recall", type=float, help="override every dataset's per-class recall floor")
    parser.add_argument("--train-rows", type=int, help="train on the first N rows only (quick runs)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--promotion-tolerance", type=float,
                        help="largest accuracy drop accepted against the production model (default 0.005)")
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
