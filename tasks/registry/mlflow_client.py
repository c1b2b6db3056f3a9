"""The MLflow tracking server as a registry store: each dataset is a registered model, each run an MLflow run, production an alias.

Chosen with ``--registry http(s)://host:port`` (an MLflow tracking server; ``mlflow server`` serves the
artifacts too). For every dataset a run

- creates an MLflow run named after the train-mnist version: parameters, test metrics, per-class precision and
  recall, the champion comparison, the confusion matrix, curves, model card and validation report, and the data
  lineage as ``data.<split>.*`` tags;
- logs ``model.keras`` with the Keras flavour and an input signature (raw 0..255 rows in, probabilities out)
  as a new version of the registered model named after the dataset, once its gates passed;
- moves the ``production`` alias to that version only if the champion comparison passed too.

A failed gate, a refused challenger or an unreadable champion leaves the alias where it was; the run's tags
``train_mnist.decision`` and ``train_mnist.reason`` say why. MLflow is an optional extra
(``pip install -e ".[mlflow]"``), imported only when such a registry is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks import artifacts
from tasks.datasets import NUM_PIXELS
from tasks.download.locations import credentials_of, redact
from tasks.registry.interface import PublishConflict, check_fence
from tasks.registry.mlflow_inputs import log_datasets, log_example
from tasks.results import DataLineage

PRODUCTION_ALIAS = "production"
EXPERIMENT_PREFIX = "train-mnist"
DECISION_TAG = "train_mnist.decision"
REASON_TAG = "train_mnist.reason"
VERSION_TAG = "train_mnist.version"
PROFILE_ARTIFACT = artifacts.PROFILE_FILE
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value is 8000
EXAMPLE_ROWS = 2  # test rows stored with a registered model's run as a request example
TO_VERSION_TAG = "train_mnist.to_version"  # a rollback's target
PIN_TAG = "train_mnist.pin"  # on the registered model while production is pinned (the Pin as JSON)
AUTH_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # how MLflow's client takes credentials

Decision = str  # "published" | "gate_failed" | "refused" | "canary_refused" | "champion_unreadable" | "failed"
PUBLISH_CONFLICT = "refused_publish_conflict"  # registered, but production moved meanwhile: never served


class MlflowRegistryError(RuntimeError):
    """The MLflow server cannot be used as a registry (unreachable, refused a request)."""


def is_mlflow_uri(registry: str | Path | None) -> bool:
    return isinstance(registry, str) and registry.startswith(("http://", "https://"))


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces; class names may hold more."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


@dataclass(frozen=True)
class MlflowRecord:
    """Where a run went in MLflow."""

    run_id: str
    model_version: str | None  # registered model version, when the model was logged
    run_url: str


class MlflowServer:
    """A registry on an MLflow tracking server; one registered model per dataset."""

    def __init__(self, tracking_uri: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        # MLflow's client never sees the credentials in the URI (it would print them in run URLs): they reach
        # it as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, set only while it talks to this server.
        bare, self._auth = credentials_of(tracking_uri.rstrip("/"))
        self.tracking_uri = bare
        self.shown = redact(self.tracking_uri)  # for everything a person or another host sees
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def __repr__(self) -> str:
        return f"MlflowServer({self.shown})"

    @contextlib.contextmanager
    def credentials_kept_out(self) -> Iterator[None]:
        """Talk to this server: its credentials in MLflow's environment variables for the duration (and the
        variables as they were afterwards, so they never reach another server), and an error that quotes
        them raised again without them, and without the original chained to it (a traceback would print it)."""
        if self._auth is None:
            yield
            return
        saved = {name: os.environ.get(name) for name in AUTH_VARIABLES}
        os.environ.update(zip(AUTH_VARIABLES, self._auth, strict=True))
        try:
            yield
        except Exception as exc:
            password = self._auth[1]
            if not password or password not in str(exc):
                raise
            text = str(exc).replace(password, "***")
            raise MlflowRegistryError(f"{self.shown}: {type(exc).__name__}: {text}") from None
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    # ---- reading the champion ------------------------------------------------------------------

    def production(self, dataset: str) -> str | None:
        """The registered model version the production alias names, or None when there is none yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(dataset, PRODUCTION_ALIAS).version
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None  # no registered model, or no alias yet: the first version decides by its gates
            raise MlflowRegistryError(f"{self.shown}: cannot read alias {PRODUCTION_ALIAS!r} of "
                                      f"registered model {dataset!r}: {exc}") from None

    def model_uri(self, dataset: str, version: str) -> str:
        return f"models:/{dataset}/{version}"

    def load_model(self, dataset: str, version: str):
        """The registered Keras model, loaded with Keras safe mode (no code from the file runs)."""
        from tasks.model_io import import_keras

        import_keras()
        self._use_server()
        with tempfile.TemporaryDirectory(prefix="train-mnist-champion-") as copy:  # the loaded model needs no file
            return self._mlflow.keras.load_model(self.model_uri(dataset, version), dst_path=copy,
                                                 load_model_kwargs={"safe_mode": True, "compile": False})

    def version_tag(self, dataset: str, version: str, tag: str) -> str | None:
        return self.client.get_model_version(dataset, version).tags.get(tag)

    def download_run_artifact(self, dataset: str, version: str, name: str, dest_dir: Path) -> Path | None:
        """A file stored at the top of a registered version's run (the data profile, the canary batch), copied
        into ``dest_dir``, if the run has it."""
        run_id = self.client.get_model_version(dataset, version).run_id
        if name not in {a.path for a in self.client.list_artifacts(run_id)}:
            return None
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, name, str(dest_dir)))

    # ---- recording a run -------------------------------------------------------------------------

    def record_run(self, dataset: str, version: str, *, params: dict[str, Any], metrics: dict[str, float],
                   tags: dict[str, str], artifacts: dict[str, Path], decision: Decision, reason: str,
                   model_path: Path | None = None, promote: bool = False, compared: str | None = None,
                   datasets: dict[str, DataLineage] | None = None,
                   example: np.ndarray | None = None) -> MlflowRecord:
        """One MLflow run for one dataset; the model logged as a new registered version when given, and the
        production alias moved to it when ``promote``, fenced: only if it still names ``compared`` (the champion
        the run was compared against; None: no alias yet)."""
        experiment_id = self.experiment_id(dataset)
        run = self.client.create_run(experiment_id, run_name=version, tags={
            VERSION_TAG: version, DECISION_TAG: decision, REASON_TAG: reason[:MAX_TAG_CHARS],
            **{k: v[:MAX_TAG_CHARS] for k, v in tags.items()}})
        run_id = run.info.run_id
        model_version: str | None = None
        try:
            self._log_values(run_id, params, metrics)
            if datasets:
                log_datasets(self.client, run_id, dataset, datasets)
            for name, path in artifacts.items():
                if path.is_file():
                    self.client.log_artifact(run_id, str(path), artifact_path=_artifact_folder(name))
            if model_path is not None:
                if promote:
                    self.fence(dataset, version, compared)
                if example is not None:
                    log_example(self.client, run_id, example)
                model_version = self._log_model(run_id, dataset, version, model_path)
                if promote:
                    try:
                        self.fence(dataset, version, compared)
                    except PublishConflict as exc:
                        self._mark_refused(run_id, dataset, model_version, str(exc))
                        raise
                    self.client.set_registered_model_alias(dataset, PRODUCTION_ALIAS, model_version)
                # Tagged once the decision holds: a version that lost the fence is never tagged published.
                self.client.set_model_version_tag(dataset, model_version, DECISION_TAG, decision)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")
        return MlflowRecord(run_id, model_version, f"{self.shown}/#/experiments/{experiment_id}/runs/{run_id}")

    def _mark_refused(self, run_id: str, dataset: str, model_version: str, reason: str) -> None:
        """The run and its registered version lost the fence: both say refused, and why."""
        for key, value in ((DECISION_TAG, PUBLISH_CONFLICT), (REASON_TAG, reason[:MAX_TAG_CHARS])):
            self.client.set_tag(run_id, key, value)
            self.client.set_model_version_tag(dataset, model_version, key, value)

    def fence(self, dataset: str, version: str, compared: str | None) -> None:
        where = f"alias {PRODUCTION_ALIAS!r} of registered model {dataset!r} in {self.shown}"
        check_fence(dataset, version, compared, self.production(dataset), where)

    def record_failure(self, dataset: str, version: str, stage: str, reason: str,
                       artifacts: dict[str, Path]) -> MlflowRecord:
        """An MLflow run for a night that stopped before training: why, in tags, and its reports."""
        return self.record_run(dataset, version, params={}, metrics={}, tags={"train_mnist.stage": stage},
                               artifacts=artifacts, decision="failed", reason=reason)

    def experiment_id(self, dataset: str) -> str:
        name = f"{EXPERIMENT_PREFIX}/{dataset}"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created by a concurrent run in the meantime
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_values(self, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric, Param

        self.client.log_batch(
            run_id,
            params=[Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in params.items()],
            metrics=[Metric(metric_key(k), float(v), 0, 0) for k, v in metrics.items() if v is not None],
        )

    def _log_model(self, run_id: str, dataset: str, version: str, model_path: Path) -> str:
        """Log the Keras model under the run and register it, with its signature (raw 0..255 uint8 rows
        ``[-1, 784]`` in, float32 probabilities out); the registered version number."""
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from tasks.model_io import import_keras, load_model

        keras = import_keras()
        import tensorflow as tf

        model = load_model(model_path)
        classes = int(model.output_shape[-1])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, NUM_PIXELS), "pixels")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "probabilities")]),
        )
        with self._mlflow_run(run_id):
            info = self._mlflow.keras.log_model(
                model, name="model", signature=signature, registered_model_name=dataset,
                # Given, not inferred: inference loads the model in a subprocess, which costs seconds.
                pip_requirements=[f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"],
                tags={VERSION_TAG: version},
            )
        registered = info.registered_model_version
        if registered is None:
            raise MlflowRegistryError(f"{self.shown}: model of run {run_id} was not registered as {dataset!r}")
        self.client.set_model_version_tag(dataset, str(registered), VERSION_TAG, version)
        return str(registered)

    def _use_server(self) -> None:
        """Point MLflow's module-level (fluent) API at this server: ``log_model`` and ``load_model`` use it."""
        self._mlflow.set_tracking_uri(self.tracking_uri)
        self._mlflow.set_registry_uri(self.tracking_uri)

    def _mlflow_run(self, run_id: str):
        """Make ``run_id`` the active run of the fluent API against this server (for ``log_model``)."""
        self._use_server()
        return self._mlflow.start_run(run_id=run_id)


def _artifact_folder(name: str) -> str | None:
    """Reports under ``reports/``, pictures and tables at the top, so the MLflow UI lists what matters first."""
    return "reports" if name.endswith((".json", ".md", ".html")) and name != PROFILE_ARTIFACT else None
