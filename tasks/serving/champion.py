"""The model a server answers with, and how it follows the registry's production pointer without a failed request.

A watcher looks at the pointer (folder registry) or the alias (MLflow) at once when the server starts, then
every ``poll_seconds``. When it names another version, that version is loaded and checked as the canary
checks it at publish (``tasks.publishing.canary.check_loaded``: the same predictions and probabilities on its
canary batch as recorded then, finite outputs, one per class of the dataset, a latency within budget) and
only then swapped in, by replacing one reference. A request reads that reference once, so requests in
flight finish on the old model and new ones get the new one.

Nothing here is final: a registry that cannot be reached (or has no production version yet) and a version
that is refused are tried again with a backoff (``RETRY_FIRST_S`` doubling to ``RETRY_MAX_S``), and at once
when the pointer moves; each failed try is one log line, and the model's metadata shows the refusal and
when the next try is. The latency check is judged against the load: over budget refuses a version only if
it is also slower than the version serving now, timed on the same rows at the same moment.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from tasks.datasets import ImageProfile
from tasks.model_io import compiled_forward
from tasks.publishing.canary import LATENCY_ROWS, check_loaded
from tasks.validation.profiling import read_profile

logger = logging.getLogger("train_mnist.serving")
POLL_SECONDS = 5.0
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0


def now() -> datetime:
    return datetime.now(UTC)


def stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Served:
    """A loaded, checked version: what answers requests."""

    version: str
    forward: Callable[[np.ndarray], np.ndarray]  # (N, 784) raw pixels -> (N, classes) probabilities, traced once
    where: str  # inside the registry: <dataset>/<version>/model.keras, or models:/<dataset>/<version>
    since: str  # when it was swapped in (UTC, ISO 8601)
    trained_on: ImageProfile | None = None  # its train split's profile, what live drift is measured against


@dataclass
class Problem:
    """Why nothing new is served (a refused version, or the registry itself), and when it is tried again."""

    reason: str
    version: str | None = None  # the refused version; None: the registry could not be read
    attempts: int = 1
    at: datetime = field(default_factory=now)
    next_try: datetime = field(default_factory=now)

    def again(self, reason: str) -> Problem:
        attempts = self.attempts + 1
        delay = min(RETRY_FIRST_S * 2 ** (attempts - 1), RETRY_MAX_S)
        return Problem(reason, self.version, attempts, now(), now() + timedelta(seconds=delay))

    def shown(self) -> dict[str, Any]:
        return {"version": self.version, "reason": self.reason, "attempts": self.attempts, "at": stamp(self.at),
                "next_try_at": stamp(self.next_try)}


def first_problem(reason: str, version: str | None = None) -> Problem:
    return Problem(reason, version, 1, now(), now() + timedelta(seconds=RETRY_FIRST_S))


@dataclass
class Champion:
    """One dataset's production model in a running server, kept in step with its registry."""

    dataset: str
    location: str  # the registry: a folder or an MLflow URL, opened (again) whenever it could not be
    classes: int  # the dataset's classes: a version answering with another number is not served
    current: Served | None = None
    problem: Problem | None = None
    on_swap: Callable[[Served], None] | None = None  # told of each version swapped in (drift monitor, metrics)
    swaps: int = 0
    refusals: int = 0  # failed tries of a version production names
    registry_failures: int = 0  # failed reads of the production pointer
    _registry: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def refused(self) -> dict[str, Any] | None:
        """The last version not swapped in, why, and when it is tried again (None when there is none)."""
        return self.problem.shown() if self.problem and self.problem.version else None

    def waiting_reason(self) -> str:
        if self.problem is not None:
            return self.problem.reason
        return "looking for the production version"

    def refresh(self) -> None:
        """Swap in the version production names now, if it is new and passes its check; a failed look or a
        refused version is retried on its backoff, or at once when the pointer moves."""
        with self._lock:  # one refresh at a time; requests never wait for it
            if self.problem and self.problem.version is None and now() < self.problem.next_try:
                return
            try:
                registry = self._registry or self._open()
                version = registry.production(self.dataset)
            except Exception as exc:  # noqa: BLE001 - an unreachable registry is waited out, not fatal
                self._registry = None
                self._failed(f"cannot read the production version from {self._shown_location()}: "
                             f"{type(exc).__name__}: {first_line(exc)}")
                return
            if version is None:
                self._failed(f"no production version in {self._shown_location()} yet")
                return
            if self.current and version == self.current.version:
                self.problem = None if self.problem and self.problem.version is None else self.problem
                return
            retry = self.problem is not None and self.problem.version == version
            if retry and now() < self.problem.next_try:
                return
            try:
                candidate = self._load_and_check(registry, version)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
                reason = f"{type(exc).__name__}: {self._scrubbed(first_line(exc))}"
                self.problem = self.problem.again(reason) if retry else first_problem(reason, version)
                self.refusals += 1
                logger.warning("%s: production names %s, but it is not served (try %d: %s); still serving %s; next "
                               "try at %s", self.dataset, version, self.problem.attempts, reason,
                               self.current.version if self.current else "nothing", stamp(self.problem.next_try))
                return
            previous, self.current, self.problem = self.current, candidate, None
            self.swaps += 1
            if self.on_swap is not None:
                self.on_swap(candidate)
            logger.info("%s: now serving %s (was %s)", self.dataset, version, previous.version if previous else "none")

    def _open(self):
        from tasks.registry import open_registry

        self._registry = open_registry(self.location)
        return self._registry

    def _failed(self, reason: str) -> None:
        self.registry_failures += 1
        retry = self.problem is not None and self.problem.version is None
        self.problem = self.problem.again(reason) if retry else first_problem(reason)
        logger.warning("%s: %s (try %d; next try at %s)", self.dataset, reason, self.problem.attempts,
                       stamp(self.problem.next_try))

    def _load_and_check(self, registry, version: str) -> Served:
        started = time.perf_counter()
        where, model = registry.load_version(self.dataset, version)
        load_s = time.perf_counter() - started
        classes = int(model.output_shape[-1])
        if classes != self.classes:
            raise ValueError(f"{version} answers with {classes} classes, but {self.dataset} has {self.classes}")
        with tempfile.TemporaryDirectory(prefix="train-mnist-serve-") as tmp:
            batch = registry.canary_batch(self.dataset, version, Path(tmp))
            if batch is None:
                raise ValueError(f"{version} has no canary batch; it cannot be checked before serving")
            check = check_loaded(model, batch, load_s, reference_latency_s=self._serving_latency(batch))
            if not check.passed:
                raise ValueError("its canary check failed: "
                                 + "; ".join(r for r in check.reasons if r.startswith("FAIL")))
            trained_on = self._training_profile(registry, version, Path(tmp))
        return Served(version, compiled_forward(model), self._inside_registry(where, version),
                      stamp(now()), trained_on)

    def _training_profile(self, registry, version: str, tmp: Path) -> ImageProfile | None:
        """The version's train-split profile, if it was published with one (older versions were not)."""
        profile = read_profile(registry.version_profile(self.dataset, version, tmp))
        return profile.get("train") if profile else None

    def _serving_latency(self, batch: Path) -> float | None:
        """How long the version serving now takes for the canary's latency rows, timed now, under today's load."""
        if self.current is None:
            return None
        with np.load(batch, allow_pickle=False) as arrays:
            rows = arrays["pixels"][:LATENCY_ROWS].astype(np.float32)
        started = time.perf_counter()
        self.current.forward(rows)
        return time.perf_counter() - started

    def _inside_registry(self, where: str, version: str) -> str:
        """Where the version lives, as the registry names it, never a path of this machine's file system."""
        return where if where.startswith("models:/") else f"{self.dataset}/{version}/{Path(where).name}"

    def _shown_location(self) -> str:
        from tasks.download.locations import redact

        return redact(self.location) if "://" in self.location else "the folder registry"

    def _scrubbed(self, text: str) -> str:
        """``text`` without the registry's own path on this machine (error messages quote whole file paths)."""
        if "://" in self.location:
            from tasks.download.locations import redact

            return text.replace(self.location.rstrip("/"), redact(self.location))
        root = str(Path(self.location).resolve())
        return text.replace(root, "<registry>").replace(str(self.location).rstrip("/"), "<registry>")

    def status(self) -> dict[str, Any]:
        """What the metadata endpoint tells about this model: the version serving, since when, and any refusal
        or registry trouble with its next try; locations inside the registry, never on this machine's disk."""
        current = self.current
        return {"registry": self._shown_location() if "://" in self.location else "folder",
                "source": current.where if current else None, "serving_since": current.since if current else None,
                "last_refusal": self.refused,
                "registry_problem": self.problem.shown() if self.problem and self.problem.version is None else None}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def follow(champions: list[Champion], poll_seconds: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread that refreshes every champion at once, then every ``poll_seconds``, until ``stop`` is set."""
    def loop() -> None:
        while True:
            for champion in champions:
                try:
                    champion.refresh()
                except Exception as exc:  # noqa: BLE001 - refresh reports its own trouble; this is a last guard
                    logger.warning("%s: %s: %s", champion.dataset, type(exc).__name__, first_line(exc))
            if stop.wait(poll_seconds):
                return

    thread = threading.Thread(target=loop, name="train-mnist-follow-production", daemon=True)
    thread.start()
    return thread
