"""Content-keyed Prefect cache policies: a stage is redone only when its input bytes or its code change.

A key is the SHA-256 of the stage's input files (never their URLs or mtimes) plus the code version:
the task's source (Prefect's ``TASK_SOURCE``), the source of the module that defines it and of every
project module that module imports (transitively: editing ``tasks/datasets.py`` invalidates every
stage), and the versions of the libraries that shape the stage's output (pyarrow for conversion; pyarrow,
Great Expectations, NumPy and pandas for validation). Where a stage places its outputs (the raw or
Parquet folder) is part of the key too, so a run with another data dir never receives files from elsewhere.

A cached result is only served while the files it names are still there and hold the recorded bytes
(raw files their verified SHA-256, Parquet files the SHA-256 recorded beside them when written): a
stale record is skipped and the stage runs again. Prefect offers no way to
delete a record, so the next key is derived from the stale one (``base``, then ``H(base, 1)``, ...).

Results are persisted in Prefect's default result storage (``PREFECT_LOCAL_STORAGE_PATH``, by default
``~/.prefect/storage``): the data dir is a flow parameter, known only at run time, while these policies
are fixed when the tasks are declared; a deployment redirects the records with that one setting. The
records are a few hundred bytes (paths and checksums, not data), and a record whose files were
deleted, or which comes from another data dir, is never served.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from tasks import storage
from tasks.datasets import DatasetSpec, Split
from tasks.results import RawFile

PROJECT_PACKAGES = ("tasks", "flows")
HASHED_OUTPUT_SUFFIXES = (".parquet",)  # outputs whose bytes are recorded at write and checked before serving
MAX_GENERATIONS = 64  # stale records skipped before a key gives up on caching altogether

def module_source(module_name: str) -> str:
    """The source text of a module (its name when it has no source file)."""
    spec = importlib.util.find_spec(module_name)
    origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        return module_name
    return Path(origin).read_text()


def project_imports(module_name: str, source: str) -> set[str]:
    """Project modules (``tasks.*``, ``flows.*``) that ``source`` imports, at any depth of the file."""
    found: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return found
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES and _is_module(name):
                found.add(name)
    found.discard(module_name)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ``from tasks.x import NAME``: NAME is not a module
        return False


def dependency_sources(module_name: str) -> dict[str, str]:
    """SHA-256 of the source of ``module_name`` and of every project module it imports, transitively."""
    hashes: dict[str, str] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in hashes:
            continue
        source = module_source(name)
        hashes[name] = hashlib.sha256(source.encode()).hexdigest()
        pending.extend(project_imports(name, source) - hashes.keys())
    return dict(sorted(hashes.items()))


def library_version(name: str) -> str:
    """The imported version of a library (``__version__``), or "absent"."""
    try:
        return str(importlib.import_module(name).__version__)
    except (ImportError, AttributeError):
        return "absent"


def code_version(task_ctx: TaskRunContext, libraries: tuple[str, ...] = ()) -> str:
    """The task's own source, the sources of its module's project dependencies and its libraries' versions."""
    task_source = TASK_SOURCE.compute_key(task_ctx, {}, {})
    return hash_objects(task_source, dependency_sources(task_ctx.task.fn.__module__),
                        {name: library_version(name) for name in libraries}, raise_on_failure=True)


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
    paths = list(output_paths(value))
    problems = [f"{p} is missing" for p in paths if not p.exists()]
    for p in paths:
        if p.suffix in HASHED_OUTPUT_SUFFIXES and p.is_file():
            recorded, found = storage.recorded_sha256(p), storage.sha256_file(p)
            if recorded != found:
                problems.append(f"{p} changed: sha256 {found[:12]}..., recorded at write "
                                f"{recorded[:12] + '...' if recorded else 'nothing'}")
    # A raw file (path + sha256) must still hold the bytes it was verified to hold.
    path, sha256 = getattr(value, "path", None), getattr(value, "sha256", None)
    if not problems and isinstance(path, Path) and isinstance(sha256, str) and path.is_file():
        found = storage.sha256_file(path)
        if found != sha256:
            problems.append(f"{path} changed: sha256 {found[:12]}..., recorded {sha256[:12]}...")
    return problems


# ---- the policy ----------------------------------------------------------------------------------

Identity = Callable[..., dict[str, Any] | None]  # called with the task's arguments by name


@dataclass
class ContentCache(CachePolicy):
    """Key: ``identity(inputs)`` (content hashes, output place) + code version; stale records are skipped.

    ``identity`` takes the task's arguments by name and returns what decides the result, or None when the
    result must not be cached.
    """

    identity: Identity | None = None
    label: str = "content"
    libraries: tuple[str, ...] = ()  # libraries whose versions shape the output
    on_hit: Callable[[TaskRunContext, Any, dict[str, Any]], None] | None = field(default=None, repr=False)

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        if task_ctx is None or self.identity is None:
            return None
        parts = self.identity(**inputs)
        if parts is None:
            return None
        base = hash_objects(self.label, parts, code_version(task_ctx, self.libraries), raise_on_failure=True)
        return self._first_servable_key(task_ctx, base, inputs)

    def _first_servable_key(self, task_ctx: TaskRunContext, base: str, inputs: dict[str, Any]) -> str | None:
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
                if self.on_hit is not None:
                    try:
                        self.on_hit(task_ctx, value, inputs)
                    except Exception:  # noqa: BLE001 - a log line must never break key computation
                        pass
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


def download_identity(spec: DatasetSpec, split: Split, raw_dir: Path, **_: Any) -> dict[str, Any] | None:
    """The split's pinned sha256 and its place in the raw cache; unpinned splits are never cached."""
    pinned = spec.split(split).sha256
    if not pinned:
        return None
    return {"sha256": pinned, "raw_dir": str(Path(raw_dir).resolve()), "dataset": spec.name,
            "split": split, "path": spec.split(split).path}


# What validation does not read: a changed gate or training recipe must not repeat it.
NOT_VALIDATED = {"gates", "recipe"}


def validate_identity(spec: DatasetSpec, train_path: Path, test_path: Path, champion_profile: Path | None = None,
                      **_: Any) -> dict[str, Any] | None:
    """The bytes of both raw files (and of the champion's profile) and what validation reads of the spec
    (layout, row counts, reference statistics and profile, tolerances), not its gates or recipe."""
    if not (Path(train_path).is_file() and Path(test_path).is_file()):
        return None  # nothing to key on: let the stage run and report the missing file itself
    if champion_profile is not None and not Path(champion_profile).is_file():
        return None
    return {
        "train_sha256": storage.sha256_file(Path(train_path)),
        "test_sha256": storage.sha256_file(Path(test_path)),
        "champion_profile_sha256": storage.sha256_file(Path(champion_profile)) if champion_profile is not None else None,
        "spec": spec.model_dump_json(exclude=NOT_VALIDATED),
    }


def convert_identity(raw: RawFile, has_header: bool, parquet_dir: Path, dataset: str, split: Split,
                     **_: Any) -> dict[str, Any]:
    """The raw file's verified sha256 (carried by ``RawFile``), its layout and the Parquet folder."""
    return {
        "sha256": raw.sha256,
        "has_header": bool(has_header),
        "parquet_dir": str(Path(parquet_dir).resolve()),
        "dataset": dataset,
        "split": split,
    }


def log_download_hit(task_ctx: TaskRunContext, value: Any, inputs: dict[str, Any]) -> None:
    """Say that the verified cached copy was used and that the source given to this run was not contacted."""
    from prefect import get_run_logger

    from tasks.download.locations import redact

    get_run_logger().info(
        "used the verified cached copy %s (sha256 %s..., fetched from %s at %s); source %s was not contacted",
        value.path, value.sha256[:12], value.location, getattr(value, "fetched_at", None) or "an unknown time",
        redact(str(inputs.get("source"))))


DOWNLOAD_CACHE = ContentCache(identity=download_identity, label="download", on_hit=log_download_hit)
VALIDATE_CACHE = ContentCache(identity=validate_identity, label="validate",
                              libraries=("pyarrow", "great_expectations", "numpy", "pandas"))
CONVERT_CACHE = ContentCache(identity=convert_identity, label="convert", libraries=("pyarrow",))
