"""What an operator does on a bad night: roll production back, pin it, unpin it; on either registry.

Each takes the same publish lock as a nightly publish and moves production only through the same fence
(it must still name the version read under the lock). A rollback's target passes the canary first (its
``canary.npz`` scored as at publish: the same predictions and probabilities, finite, within budget), or
production stays where it is. Every action is a line of the dataset's run log (outcome ``rolled_back``,
``pin`` or ``unpin``; from, to, who asked and why). A model server follows a rollback as it follows a
promotion. Refusals (an unknown dataset or version, no earlier version, a pruned one, a failed canary)
are ``OperationRefused`` with one line saying why; nothing changes then.
"""

from __future__ import annotations

import getpass
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import task

from tasks.publishing.canary import check_loaded
from tasks.registry import Pin, Registry
from tasks.reporting import events
from tasks.vocabulary import Outcome, Stage, StageFailure


class OperationRefused(StageFailure):
    """A rollback, pin or unpin that cannot be done as asked; production is unchanged."""

    stage = Stage.PUBLISH


@dataclass(frozen=True)
class OperationResult:
    dataset: str
    action: Outcome
    production_before: str | None
    production_after: str | None
    reason: str
    requested_by: str

    def line(self) -> str:
        what = {Outcome.ROLLED_BACK: f"production rolled back from {self.production_before} to "
                                     f"{self.production_after}",
                Outcome.PIN: f"production pinned at {self.production_after}",
                Outcome.UNPIN: f"production unpinned (at {self.production_after})"}[self.action]
        return f"{self.dataset}: {what} (by {self.requested_by}{': ' + self.reason if self.reason else ''})"


def who_asks(via: str) -> str:
    """Who asked, for the run log: the user and machine, and how (the CLI or a deployment run)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()} via {via}"


def previous_production(history: list[str], current: str) -> str | None:
    """The version production named before it last became ``current``, by the run log."""
    if current not in history:
        return None
    last = len(history) - 1 - history[::-1].index(current)
    earlier = [v for v in history[:last] if v != current]
    return earlier[-1] if earlier else None


def rollback(registry: Registry, dataset: str, to: str | None = None, reason: str = "",
             requested_by: str = "") -> OperationResult:
    """Move production back to the version before the current one (or to ``to``), if its canary passes."""
    requested_by = requested_by or who_asks("train-mnist rollback")
    with registry.lock(dataset):
        current = registry.production(dataset)
        if current is None:
            raise OperationRefused(f"{dataset}: no production version in {registry.location}; nothing to roll back")
        target = to or previous_production(registry.production_history(dataset), current)
        if target is None:
            raise OperationRefused(f"{dataset}: no earlier production version to roll back to (the run log names "
                                   f"only {current}); name one with --to")
        if target == current:
            raise OperationRefused(f"{dataset}: {target} is production already")
        if not registry.has_version(dataset, target):
            raise OperationRefused(f"{dataset}: version {target} does not exist in {registry.location} (never "
                                   "published, or pruned by retention); production stays at " + current)
        canary_passes(registry, dataset, target)
        registry.move_production(dataset, target, compared=current)
        registry.record_operation(dataset, Outcome.ROLLED_BACK, target, current, reason, requested_by)
    events.emit(events.ROLLED_BACK, dataset, target, {"from": current, "to": target, "reason": reason,
                                                      "requested_by": requested_by})
    return OperationResult(dataset, Outcome.ROLLED_BACK, current, target, reason, requested_by)


def canary_passes(registry: Registry, dataset: str, version: str) -> None:
    """Load ``version`` and score its canary batch as at publish; ``OperationRefused`` naming why not."""
    started = time.perf_counter()
    try:
        _, model = registry.load_version(dataset, version)
    except Exception as exc:  # noqa: BLE001 - whatever stops it loading refuses it
        raise OperationRefused(f"{dataset}: {version} does not load ({type(exc).__name__}: {exc}); production "
                               "unchanged") from None
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="train-mnist-rollback-") as tmp:
        batch = registry.canary_batch(dataset, version, Path(tmp))
        if batch is None:
            raise OperationRefused(f"{dataset}: {version} has no canary batch to check it with; production unchanged")
        result = check_loaded(model, batch, load_s)
    if not result.passed:
        failed = "; ".join(r for r in result.reasons if r.startswith("FAIL"))
        raise OperationRefused(f"{dataset}: {version} failed its canary ({failed}); production unchanged")


def pin(registry: Registry, dataset: str, reason: str = "", requested_by: str = "") -> OperationResult:
    """Freeze production where it is: nightly runs go on training and recording, but never move it."""
    requested_by = requested_by or who_asks("train-mnist pin")
    with registry.lock(dataset):
        current = registry.production(dataset)
        if current is None:
            raise OperationRefused(f"{dataset}: no production version in {registry.location} to pin")
        held = registry.pin(dataset)
        if held is not None:
            raise OperationRefused(f"{dataset}: pinned already at {held.version} by {held.by} on {held.at}"
                                   f"{': ' + held.reason if held.reason else ''}")
        registry.set_pin(dataset, Pin(version=current, reason=reason, by=requested_by,
                                      at=datetime.now(UTC).isoformat(timespec="seconds")))
        registry.record_operation(dataset, Outcome.PIN, current, current, reason, requested_by)
    return OperationResult(dataset, Outcome.PIN, current, current, reason, requested_by)


def unpin(registry: Registry, dataset: str, reason: str = "", requested_by: str = "") -> OperationResult:
    """End a pin: the next nightly run may move production again."""
    requested_by = requested_by or who_asks("train-mnist unpin")
    with registry.lock(dataset):
        if registry.pin(dataset) is None:
            raise OperationRefused(f"{dataset}: production is not pinned")
        current = registry.production(dataset)
        registry.set_pin(dataset, None)
        registry.record_operation(dataset, Outcome.UNPIN, current or "", current, reason, requested_by)
    return OperationResult(dataset, Outcome.UNPIN, current, current, reason, requested_by)


ACTIONS = {"rollback": rollback, "pin": pin, "unpin": unpin}


def main(action: str, argv: list[str] | None = None) -> int:
    """``train-mnist rollback|pin|unpin``: one line saying what changed (exit 0), or why nothing did (exit 1;
    2 for an unknown dataset)."""
    import argparse

    from tasks.datasets import DatasetConfigError, load_catalog, select_datasets
    from tasks.registry import ChampionUnreadable, open_registry
    from tasks.registry.interface import PublishConflict
    from tasks.registry.lock import PublishLockUnsafe
    from tasks.settings import Settings

    parser = argparse.ArgumentParser(prog=f"train-mnist {action}", description=(ACTIONS[action].__doc__ or "")
                                     .splitlines()[0])
    parser.add_argument("--dataset", required=True, help="the dataset whose production model this acts on")
    if action == "rollback":
        parser.add_argument("--to", help="the version to go back to (default: the one before the current)")
    parser.add_argument("--registry", help="a folder or an MLflow URL (default <data-dir>/registry; env "
                        "TRAIN_MNIST_REGISTRY)")
    parser.add_argument("--datasets-file", help="TOML file with more dataset definitions")
    parser.add_argument("--reason", default="", help="why, for the run log")
    args = parser.parse_args(argv)
    try:
        [spec] = select_datasets(load_catalog(args.datasets_file), [args.dataset.strip()])
    except (DatasetConfigError, ValueError) as exc:
        print(f"train-mnist {action}: {exc}", file=sys.stderr)
        return 2
    extra = {"to": args.to} if action == "rollback" else {}
    try:
        registry = open_registry(args.registry or Settings().registry_location)
        result = ACTIONS[action](registry, spec.name, reason=args.reason, **extra)
    except (OperationRefused, ChampionUnreadable, PublishConflict, PublishLockUnsafe) as exc:
        print(f"train-mnist {action}: {exc}", file=sys.stderr)
        return 1
    print(result.line())
    events.flush()  # the rolled-back event, when a Prefect server is configured
    return 0


@task(name="operation", task_run_name="{action}-{dataset}")
def operation_task(action: str, dataset: str, registry: str | None, reason: str, to: str | None = None) -> str:
    """An action from a deployment run: done (its line, and an artifact saying what changed) or refused."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.registry import open_registry
    from tasks.settings import Settings

    extra = {"to": to} if action == "rollback" else {}
    who = who_asks(f"the {action}/train-mnist deployment")
    result = ACTIONS[action](open_registry(registry or Settings().registry_location), dataset, reason=reason,
                             requested_by=who, **extra)
    create_markdown_artifact(key=f"{dataset.replace('_', '-')}-{action}", markdown=(
        f"# {dataset}: {action}\n\n{result.line()}\n\n| before | after | by | reason |\n| --- | --- | --- | --- |\n"
        f"| {result.production_before} | {result.production_after} | {who} | {reason or '-'} |\n"),
        description=result.line())
    return result.line()
