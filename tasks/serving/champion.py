"""The model a server answers with, and how it follows the registry's production pointer without a failed request.

A watcher polls the pointer (folder registry) or the alias (MLflow). When it names another version, that
version is loaded and checked as the canary checks it at publish (``tasks.publishing.canary.check_loaded``: the same
predictions and probabilities on its canary batch as recorded then, within the latency budget), and only
then swapped in, by replacing one reference. A request reads that reference once, so requests in flight
finish on the old model and new ones get the new one. A version that does not load or fails the check is
not swapped in: the old one keeps serving, and the refusal (version and reason) is logged and shown in the
model's metadata; that version is not tried again until the pointer moves on.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.model_io import compiled_forward
from tasks.publishing.canary import check_loaded

logger = logging.getLogger("train_mnist.serving")
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Served:
    """A loaded, checked version: what answers requests."""

    version: str
    forward: Callable[[np.ndarray], np.ndarray]  # (N, 784) raw pixels -> (N, classes) probabilities, traced once
    where: str  # its model file or MLflow URI
    since: str  # when it was swapped in (UTC, ISO 8601)


@dataclass
class Champion:
    """One dataset's production model in a running server, kept in step with its registry."""

    dataset: str
    registry: Any  # tasks.registry.Registry
    current: Served | None = None
    refused: dict[str, str] | None = None  # the last version not swapped in, and why
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh(self) -> None:
        """Swap in the version production names now, if it is new and passes its check."""
        with self._lock:  # one refresh at a time; requests never wait for it
            version = self.registry.production(self.dataset)
            if version is None or (self.current and version == self.current.version) \
                    or (self.refused and self.refused["version"] == version):
                return
            try:
                candidate = self._load_and_check(version)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
                self.refused = {"version": version, "reason": f"{type(exc).__name__}: {exc}",
                                "at": datetime.now(UTC).isoformat(timespec="seconds")}
                logger.warning("%s: production names %s, but it is not served (%s); still serving %s", self.dataset,
                               version, self.refused["reason"], self.current.version if self.current else "nothing")
                return
            previous, self.current, self.refused = self.current, candidate, None
            logger.info("%s: now serving %s (was %s)", self.dataset, version, previous.version if previous else "none")

    def _load_and_check(self, version: str) -> Served:
        started = time.perf_counter()
        where, model = self.registry.load_version(self.dataset, version)
        load_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory(prefix="train-mnist-serve-") as tmp:
            batch = self.registry.canary_batch(self.dataset, version, Path(tmp))
            if batch is None:
                raise ValueError(f"{version} has no canary batch ({where}); it cannot be checked before serving")
            check = check_loaded(model, batch, load_s)
        if not check.passed:
            raise ValueError("its canary check failed: " + "; ".join(r for r in check.reasons if r.startswith("FAIL")))
        return Served(version, compiled_forward(model), where, datetime.now(UTC).isoformat(timespec="seconds"))

    def status(self) -> dict[str, Any]:
        """What the metadata endpoint tells about this model: the version serving, since when, and any refusal."""
        current = self.current
        return {"registry": self.registry.location, "source": current.where if current else None,
                "serving_since": current.since if current else None, "last_refusal": self.refused}


def follow(champions: list[Champion], poll_seconds: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread that refreshes every champion every ``poll_seconds`` until ``stop`` is set."""
    def loop() -> None:
        while not stop.wait(poll_seconds):
            for champion in champions:
                try:
                    champion.refresh()
                except Exception as exc:  # noqa: BLE001 - e.g. the registry is unreachable for a while
                    logger.warning("%s: could not read the production pointer: %s: %s", champion.dataset,
                                   type(exc).__name__, exc)

    thread = threading.Thread(target=loop, name="train-mnist-follow-production", daemon=True)
    thread.start()
    return thread
