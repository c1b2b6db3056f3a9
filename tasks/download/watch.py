"""Has the source changed? The data-arrival check behind ``flows/data_watch.py``.

Each split's file at the source is read whole and hashed (SHA-256: the same verified bytes a run would get,
through the download stage's own transport, deadlines and credential rules), and the hashes are compared
with those the last check recorded, kept on the Prefect server as a Variable per dataset and source (so
every worker sees the same record). A change emits ``train-mnist.data.changed``. The first check of a
dataset and source only records: it has nothing to compare with, and must not retrain on its own.
"""

from __future__ import annotations

import hashlib
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.datasets import DatasetSpec
from tasks.download.fetch import resolve_location
from tasks.download.locations import redact
from tasks.download.transport import open_location
from tasks.reporting import events

CHUNK = 1 << 20
TIMEOUT_S = 60.0
DEADLINE_S = 600.0


class DataCheck(BaseModel):
    dataset: str
    source: str  # redacted
    sha256: dict[str, str]  # split -> hash of the file at the source now
    changed: list[str]  # the splits whose hash differs from the last check's
    first_check: bool


def source_sha256(location: str) -> str:
    digest = hashlib.sha256()
    with open_location(location, time.monotonic() + DEADLINE_S, DEADLINE_S, TIMEOUT_S) as opened:
        while chunk := opened.stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_key(dataset: str, source: str) -> str:
    """The Prefect Variable holding the last check's hashes (names allow lowercase, digits, - and _)."""
    where = hashlib.sha256(redact(source).encode()).hexdigest()[:12]
    return f"train_mnist_data_{dataset.replace('-', '_')}_{where}"


def check_source(spec: DatasetSpec, source: str) -> DataCheck:
    """Hash the dataset's files at ``source``, compare with the last record, record, and emit the change."""
    from prefect.variables import Variable

    now = {split: source_sha256(resolve_location(source, getattr(spec, split).path, spec.name))
           for split in ("train", "test")}
    key = record_key(spec.name, source)
    before = Variable.get(key, default=None)
    changed = sorted(split for split in now if before and before.get(split) != now[split])
    check = DataCheck(dataset=spec.name, source=redact(source), sha256=now, changed=changed, first_check=not before)
    if changed:
        events.emit(events.DATA_CHANGED, spec.name, payload={
            "dataset": spec.name, "source": check.source, "changed": changed,
            "before": {s: before.get(s) for s in changed}, "after": {s: now[s] for s in changed}})
    if now != before:
        Variable.set(key, now, overwrite=True)
    return check


@task(name="check-source", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60])
def check_source_task(spec: DatasetSpec, source: str) -> DataCheck:
    return check_source(spec, source)
