"""Content-keyed Prefect cache policies: a stage is redone only when its input bytes or its code change.

A key is the SHA-256 of the stage's input files (never their URLs or mtimes) plus the code version:
the task's source (Prefect's ``TASK_SOURCE``) and the source of the module that defines it, so an edit
to ``validate_dataset`` invalidates validation just as an edit to the ``@task`` wrapper does. Where a
stage places its outputs (the raw or Parquet folder) is part of the key too, so a run with another
data dir never receives files from elsewhere.

A cached result is only served while the files it names are still there (and, for raw files, still
hold the recorded bytes): a stale record is skipped and the stage runs again. Prefect offers no way to
delete a record, so the next key is derived from the stale one (``base``, then ``H(base, 1)``, ...).

Results are persisted in Prefect's default result storage (``PREFECT_LOCAL_STORAGE_PATH``, by default
``~/.prefect/storage``): the data dir is a flow parameter, known only at run time, while these policies
are fixed when the tasks are declared; a deployment redirects the records with that one setting. The
records are a few hundred bytes (paths and checksums, not data), and a record whose files were
deleted, or which comes from another data dir, is never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

CHUNK_BYTES = 1 << 20
MAX_GENERATIONS = 64  # stale records skipped before a key gives up on caching altogether

# (path, device, inode, size, mtime_ns, ctime_ns) -> sha256: only spares re-reading a file within a
# process; the key itself is always the content hash. ctime changes on every write and cannot be set back.
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, memoized per process while the file's identity and times are unchanged."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(memo)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                sha.update(chunk)
        digest = _DIGESTS[memo] = sha.hexdigest()
    return digest


@cache
def _module_source_hash(module_name: str) -> str:
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else module_name
    except (OSError, TypeError):  # no source on disk (frozen, interactive): fall back to the name
        source = module_name
    return hashlib.sha256(source.encode()).hexdigest()


def code_version(task_ctx: TaskRunContext) -> str:
    """The task's own source (Prefect ``TASK_SOURCE``) plus the source of the module defining it."""
    task_source = TASK_SOURCE.compute_key(task_ctx, {}, {})
    return hash_objects(task_source, _module_source_hash(task_ctx.task.fn.__module__), raise_on_failure=True)


# ---- what a returned value promises --------------------------------------------------------------


def output_paths(value: Any) -> Iterator[Path]:
    """Every ``Path`` inside a returned value (dataclasses, lists, tuples and dicts are searched)."""
    if isinstance(value, Path):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from output_paths(getattr(value, f.name))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from output_paths(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from output_paths(item)


def missing_outputs(value: Any) -> list[str]:
    """Why a cached value can no longer be served: its files that are gone or hold other bytes."""
    problems = [f"{p} is missing" for p in output_paths(value) if not p.exists()]
    # A raw file (path + sha256) must still hold the bytes it was verified to hold.
    path, sha256 = getattr(value, "path", None), getattr(value, "sha256", None)
    if not problems and isinstance(path, Path) and isinstance(sha256, str) and path.is_file():
        found = file_sha256(path)
        if found != sha256:
            problems.append(f"{path} changed: sha256 {found[:12]}..., recorded {sha256[:12]}...")
    return problems


# ---- the policy ----------------------------------------------------------------------------------

Identity = Callable[[dict[str, Any]], dict[str, Any] | None]


@dataclass
class ContentCache(CachePolicy):
    """Key: ``identity(inputs)`` (content hashes, output place) + code version; stale records are skipped.

    ``identity`` returns what decides the result, or None when the result must not be cached.
    """

    identity: Identity | None = None
    label: str = "content"

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if task_ctx is None or self.identity is None:
            return None
        parts = self.identity(inputs)
        if parts is None:
            return None
        base = hash_objects(self.label, parts, code_version(task_ctx), raise_on_failure=True)
        return self._first_servable_key(task_ctx, base)

    def _first_servable_key(self, task_ctx: TaskRunContext, base: str) -> str | None:
        """The first key in ``base``'s chain with no record, or with a record whose files are intact."""
        store = task_ctx.result_store
        for generation in range(MAX_GENERATIONS):
            key = base if generation == 0 else hash_objects(base, generation, raise_on_failure=True)
            if store is None or not store.exists(key):
                return key
            try:
                value = store.read(key).result
            except Exception as exc:  # noqa: BLE001 - an unreadable record is as good as none
                problems = [f"cached record unreadable: {exc!r}"]
            else:
                problems = missing_outputs(value)
            if not problems:
                return key
            self._log_refusal(task_ctx, problems)
        return None

    def _log_refusal(self, task_ctx: TaskRunContext, problems: list[str]) -> None:
        try:
            from prefect import get_run_logger

            get_run_logger().info("not served from cache: %s; running again", "; ".join(problems))
        except Exception:  # noqa: BLE001 - logging must never break key computation
            pass


# ---- the stages' identities ----------------------------------------------------------------------


def download_identity(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The split's pinned sha256 and its place in the raw cache; unpinned splits are never cached."""
    spec, split = inputs["spec"], inputs["split"]
    pinned = spec.split(split).sha256
    if not pinned:
        return None
    return {"sha256": pinned, "raw_dir": str(Path(inputs["raw_dir"]).resolve()), "dataset": spec.name,
            "split": split, "path": spec.split(split).path}


def validate_identity(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The bytes of both raw files and the full dataset spec (reference stats, tolerances, row counts)."""
    if not (Path(inputs["train_path"]).is_file() and Path(inputs["test_path"]).is_file()):
        return None  # nothing to key on: let the stage run and report the missing file itself
    return {
        "train_sha256": file_sha256(Path(inputs["train_path"])),
        "test_sha256": file_sha256(Path(inputs["test_path"])),
        "spec": inputs["spec"].model_dump_json(),
    }


def convert_identity(inputs: dict[str, Any]) -> dict[str, Any]:
    """The raw file's verified sha256 (carried by ``RawFile``), its layout and the Parquet folder."""
    return {
        "sha256": inputs["raw"].sha256,
        "has_header": bool(inputs["has_header"]),
        "parquet_dir": str(Path(inputs["parquet_dir"]).resolve()),
        "dataset": inputs["dataset"],
        "split": inputs["split"],
    }


DOWNLOAD_CACHE = ContentCache(identity=download_identity, label="download")
VALIDATE_CACHE = ContentCache(identity=validate_identity, label="validate")
CONVERT_CACHE = ContentCache(identity=convert_identity, label="convert")
