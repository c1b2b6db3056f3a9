"""``GET /metrics``: what the model server does, in Prometheus's text format (``prometheus_client``).

Counted on the request path (a label lookup and an add each):
    train_mnist_inference_requests_total{model, version, code}     infer requests answered, by HTTP status code
    train_mnist_inference_duration_seconds{model}                   histogram of the time to answer one
    train_mnist_inference_batch_rows{model}                         histogram of the rows in one request
    train_mnist_predictions_total{model, version, predicted_class}  rows answered, by the class predicted
Read from the models' state when scraped:
    train_mnist_production_version_info{model, version}             1 for the version being served
    train_mnist_model_swaps_total{model}                            versions swapped in
    train_mnist_model_refusals_total{model}                         failed tries of a version production names
    train_mnist_registry_retries_total{model}                       failed reads of the production pointer
    train_mnist_drift_score{model, version, statistic}              live drift (``tasks.serving.monitor``)
    train_mnist_drift_threshold{model, statistic}                   the threshold each score is held to
    train_mnist_drift_window_rows{model}                            rows in the window being scored
    train_mnist_drift_episodes_total{model}                         drifts that lasted and were told
Each server has a registry of its own, so two servers in one process never share counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks.serving.champion import Champion
from tasks.serving.monitor import DriftMonitor

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self, champions: dict[str, Champion], monitors: dict[str, DriftMonitor],
                 class_names: dict[str, list[str]]):
        self.registry = CollectorRegistry()
        self.class_names = class_names
        self.requests = Counter("train_mnist_inference_requests", "Infer requests answered, by model, version "
                                "served and HTTP status code", ["model", "version", "code"], registry=self.registry)
        self.latency = Histogram("train_mnist_inference_duration_seconds", "Time to answer one infer request",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("train_mnist_inference_batch_rows", "Rows in one answered infer request", ["model"],
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.predictions = Counter("train_mnist_predictions", "Rows answered, by the class predicted",
                                   ["model", "version", "predicted_class"], registry=self.registry)
        self.registry.register(_ModelState(champions, monitors))

    def answered(self, model: str, version: str | None, code: int, seconds: float) -> None:
        self.requests.labels(model, version or "none", str(code)).inc()
        self.latency.labels(model).observe(seconds)

    def predicted(self, model: str, version: str, classes: np.ndarray) -> None:
        names = self.class_names[model]
        self.batch.labels(model).observe(len(classes))
        counts = np.bincount(classes, minlength=len(names))
        for index in np.flatnonzero(counts):
            self.predictions.labels(model, version, names[index]).inc(int(counts[index]))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ModelState(Collector):
    """Gauges and counters read from each model's champion and drift monitor at scrape time."""

    def __init__(self, champions: dict[str, Champion], monitors: dict[str, DriftMonitor]):
        self.champions, self.monitors = champions, monitors

    def collect(self) -> Iterator[Metric]:
        version = GaugeMetricFamily("train_mnist_production_version_info", "The production version being served "
                                    "(1)", labels=["model", "version"])
        swaps = CounterMetricFamily("train_mnist_model_swaps", "Versions swapped in", labels=["model"])
        refusals = CounterMetricFamily("train_mnist_model_refusals", "Failed tries of a version production names "
                                       "(not loadable, or failing its canary check)", labels=["model"])
        retries = CounterMetricFamily("train_mnist_registry_retries", "Failed reads of the production pointer, "
                                      "each retried with a backoff", labels=["model"])
        score = GaugeMetricFamily("train_mnist_drift_score", "Live drift of the served rows from the training "
                                  "profile", labels=["model", "version", "statistic"])
        threshold = GaugeMetricFamily("train_mnist_drift_threshold", "The threshold each drift score is held to",
                                      labels=["model", "statistic"])
        window = GaugeMetricFamily("train_mnist_drift_window_rows", "Rows in the drift window", labels=["model"])
        episodes = CounterMetricFamily("train_mnist_drift_episodes", "Drifts that lasted past the hold time",
                                       labels=["model"])
        for name, champion in sorted(self.champions.items()):
            if champion.current is not None:
                version.add_metric([name, champion.current.version], 1)
            swaps.add_metric([name], champion.swaps)
            refusals.add_metric([name], champion.refusals)
            retries.add_metric([name], champion.registry_failures)
            monitor = self.monitors.get(name)
            if monitor is None:
                continue
            status = monitor.status()
            for statistic, value in status["scores"].items():
                score.add_metric([name, monitor.version or "none", statistic], value["value"])
                threshold.add_metric([name, statistic], value["threshold"])
            window.add_metric([name], status["window_rows"])
            episodes.add_metric([name], status["episodes"])
        yield from (version, swaps, refusals, retries, score, threshold, window, episodes)
