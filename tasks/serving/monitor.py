"""Live input drift: a bounded window of the rows a model served, scored against what the model was trained on.

Each model keeps the last ``window_rows`` rows it answered (uint8, so 2,000 rows are 1.5 MB) with the class it
predicted for each. A background loop scores the window every ``interval_s`` with validation's own drift
statistics (``tasks.validation.profiling.serving_drift``) against the training profile of the version being
served (its ``data_profile.json``; the dataset's reference profile for a version published without one).
When any statistic stays above its threshold for ``hold_s`` seconds, the monitor raises one drift episode
(``on_drift``: a Prefect event and at most one alert); the episode ends when every statistic is back under
its threshold, and only then can another begin. A new version empties the window: rows scored by the old
model say nothing about the new one's training data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.datasets import NUM_PIXELS, DatasetSpec, ImageProfile
from tasks.validation.profiling import serving_drift

logger = logging.getLogger("train_mnist.serving")
WINDOW_ROWS = 2000
MIN_ROWS = 200  # fewer rows than this are not scored: their mean image is mostly sampling noise
HOLD_S = 60.0
INTERVAL_S = 1.0


@dataclass(frozen=True)
class DriftSettings:
    window_rows: int = WINDOW_ROWS
    min_rows: int = MIN_ROWS
    hold_s: float = HOLD_S  # how long a score must stay above its threshold before it is an episode
    interval_s: float = INTERVAL_S


@dataclass
class Episode:
    """A drift that lasted: what crossed, when it began, and the scores when it was raised."""

    dataset: str
    version: str
    statistics: list[str]
    scores: dict[str, dict[str, float]]
    above_since: float  # time.time() when the first of them crossed


@dataclass
class DriftMonitor:
    """One model's window and drift state; ``observe`` is called on the request path and only copies rows."""

    spec: DatasetSpec
    settings: DriftSettings = field(default_factory=DriftSettings)
    on_drift: Callable[[Episode], None] | None = None
    version: str | None = None
    trained_on: ImageProfile | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    above_since: dict[str, float] = field(default_factory=dict)
    episodes: int = 0
    in_episode: bool = False
    _pixels: np.ndarray = field(init=False, repr=False)
    _classes: np.ndarray = field(init=False, repr=False)
    _next: int = 0
    _filled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._pixels = np.zeros((self.settings.window_rows, NUM_PIXELS), np.uint8)
        self._classes = np.zeros(self.settings.window_rows, np.int64)

    def serve(self, version: str, trained_on: ImageProfile | None) -> None:
        """A new version is being served: start an empty window against its training profile."""
        with self._lock:
            self.version, self.trained_on = version, trained_on
            self._next = self._filled = 0
            self.scores, self.above_since, self.in_episode = {}, {}, False

    def observe(self, version: str, pixels: np.ndarray, classes: np.ndarray) -> None:
        """Add the rows one request scored (the newest ``window_rows`` of them when it holds more)."""
        rows = pixels[-self.settings.window_rows:]
        taken = classes[-self.settings.window_rows:]
        with self._lock:
            if version != self.version:
                return  # a request that began on the previous version
            end = self._next + len(rows)
            first = min(end, self.settings.window_rows) - self._next
            self._pixels[self._next:self._next + first] = rows[:first]
            self._classes[self._next:self._next + first] = taken[:first]
            self._pixels[:len(rows) - first] = rows[first:]
            self._classes[:len(rows) - first] = taken[first:]
            self._next = end % self.settings.window_rows
            self._filled = min(self._filled + len(rows), self.settings.window_rows)

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._pixels[:self._filled].copy(), self._classes[:self._filled].copy()

    def evaluate(self, now: float | None = None) -> Episode | None:
        """Score the window; returns the episode when one begins now (and hands it to ``on_drift``)."""
        now = time.time() if now is None else now
        pixels, classes = self.window()
        if self.trained_on is None or len(pixels) < self.settings.min_rows:
            return None
        counts = np.bincount(classes, minlength=len(self.spec.class_names))[:len(self.spec.class_names)].tolist()
        scores = serving_drift(pixels, counts, self.spec, self.trained_on)
        above = {name for name, s in scores.items() if s["value"] > s["threshold"]}
        with self._lock:
            self.scores = scores
            self.above_since = {name: self.above_since.get(name, now) for name in above}
            lasting = sorted(name for name, since in self.above_since.items() if now - since >= self.settings.hold_s)
            if not above:
                self.in_episode = False
            if not lasting or self.in_episode:
                return None
            self.in_episode = True
            self.episodes += 1
            episode = Episode(self.spec.name, self.version or "", lasting, scores,
                              min(self.above_since[name] for name in lasting))
        logger.warning("%s %s: input drift for over %.0f s: %s", episode.dataset, episode.version,
                       self.settings.hold_s, ", ".join(f"{n} {scores[n]['value']:.4g} > {scores[n]['threshold']:.4g}"
                                                       for n in lasting))
        if self.on_drift is not None:
            try:
                self.on_drift(episode)
            except Exception as exc:  # noqa: BLE001 - a failed notice must not stop the monitoring
                logger.warning("%s: the drift notice failed: %s: %s", episode.dataset, type(exc).__name__, exc)
        return episode

    def status(self) -> dict[str, Any]:
        """What ``GET /v2/models/{name}`` shows: each score with its threshold, the window and the episodes."""
        with self._lock:
            return {"window_rows": self._filled, "window_capacity": self.settings.window_rows,
                    "min_rows": self.settings.min_rows, "hold_seconds": self.settings.hold_s,
                    "scores": {name: {**score, "above_threshold_since": self.above_since.get(name)}
                               for name, score in self.scores.items()},
                    "in_episode": self.in_episode, "episodes": self.episodes,
                    "profile": "none (no training profile)" if self.trained_on is None else "training profile"}


def watch(monitors: list[DriftMonitor], interval_s: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread scoring every monitor each ``interval_s`` until ``stop`` is set."""
    def loop() -> None:
        while not stop.wait(interval_s):
            for monitor in monitors:
                try:
                    monitor.evaluate()
                except Exception as exc:  # noqa: BLE001 - one bad evaluation must not end the watch
                    logger.warning("%s: drift scoring failed: %s: %s", monitor.spec.name, type(exc).__name__, exc)

    thread = threading.Thread(target=loop, name="train-mnist-drift", daemon=True)
    thread.start()
    return thread
