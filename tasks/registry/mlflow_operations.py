"""An operator's rollback, pin and unpin on an MLflow registry: the alias's history read from the dataset's runs,
the alias moved behind the fence, the pin a tag of the registered model, each action a run of the experiment."""

from __future__ import annotations

from tasks.registry.mlflow_client import (
    DECISION_TAG,
    EXPERIMENT_PREFIX,
    MAX_TAG_CHARS,
    PRODUCTION_ALIAS,
    REASON_TAG,
    TO_VERSION_TAG,
    MlflowServer,
)


def has_version(server: MlflowServer, dataset: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        server.client.get_model_version(dataset, version)
    except MlflowException:
        return False
    return True


def production_history(server: MlflowServer, dataset: str) -> list[str]:
    """The registered versions the alias named, oldest first: each published run's version, each rollback's
    target, from the experiment's runs."""
    found = server.client.get_experiment_by_name(f"{EXPERIMENT_PREFIX}/{dataset}")
    if found is None:
        return []
    # MLflow's search has no IN for tags: the runs are filtered here.
    runs = [run for run in server.client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"],
                                                     max_results=10_000)
            if run.data.tags.get(DECISION_TAG) in ("published", "rolled_back")]
    by_run = {v.run_id: v.version for v in server.client.search_model_versions(f"name='{dataset}'")}
    history = []
    for run in runs:
        rollback = run.data.tags[DECISION_TAG] == "rolled_back"
        version = run.data.tags.get(TO_VERSION_TAG) if rollback else by_run.get(run.info.run_id)
        if version:
            history.append(version)
    return history


def move_alias(server: MlflowServer, dataset: str, version: str, compared: str | None) -> None:
    server.fence(dataset, version, compared)
    server.client.set_registered_model_alias(dataset, PRODUCTION_ALIAS, version)


def registered_model_tag(server: MlflowServer, dataset: str, tag: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return server.client.get_registered_model(dataset).tags.get(tag)
    except MlflowException:
        return None


def set_registered_model_tag(server: MlflowServer, dataset: str, tag: str, value: str | None) -> None:
    if value is None:
        server.client.delete_registered_model_tag(dataset, tag)
    else:
        server.client.set_registered_model_tag(dataset, tag, value)


def record_operation(server: MlflowServer, dataset: str, outcome: str, version: str, from_version: str | None, reason: str,
                     requested_by: str) -> None:
    """An operator's rollback, pin or unpin as a run of the dataset's experiment (its history)."""
    run = server.client.create_run(server.experiment_id(dataset), run_name=f"{outcome} {version}", tags={
        DECISION_TAG: outcome, REASON_TAG: reason[:MAX_TAG_CHARS], TO_VERSION_TAG: version,
        "train_mnist.from_version": from_version or "", "train_mnist.requested_by": requested_by})
    server.client.set_terminated(run.info.run_id, status="FINISHED")
