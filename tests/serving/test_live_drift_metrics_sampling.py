"""The model server's own reporting, as plain functions on slices of the real data: live drift scores (validation's
statistics), the drift window and its episodes, the Prometheus exposition, and prediction sampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasks.datasets import NUM_PIXELS
from tasks.serving.champion import Champion, Served
from tasks.serving.metrics import ServerMetrics
from tasks.serving.monitor import DriftMonitor, DriftSettings
from tasks.serving.sampling import PIXEL_COLUMNS, PredictionSampler
from tasks.validation.profiling import serving_drift


def pixels_of(mirror, path: str) -> np.ndarray:
    frame = pd.read_csv(mirror / path, header=None, compression="gzip", dtype=np.int64, comment="l")
    return frame.to_numpy()[:, 1:].astype(np.uint8)


@pytest.fixture(scope="module")
def rows(slice_mirror) -> dict[str, np.ndarray]:
    return {"mnist": pixels_of(slice_mirror, "mnist/mnist_test.csv.gz"),
            "fashion": pixels_of(slice_mirror, "fashion-mnist/fashion-mnist_test.csv.gz")}


def above(scores: dict[str, dict[str, float]]) -> set[str]:
    return {name for name, s in scores.items() if s["value"] > s["threshold"]}


def test_rows_like_the_training_data_stay_under_every_threshold(catalog, rows):
    spec = catalog["mnist"]
    counts = [60] * 10
    scores = serving_drift(rows["mnist"][:500], counts, spec, spec.reference.profile)
    assert set(scores) == {"pixel_mean_shift", "pixel_std_shift", "mean_image_rmse", "predicted_class_kl"}
    assert above(scores) == set(), scores


@pytest.mark.parametrize("other", ["inverted", "fashion", "one class only"])
def test_rows_from_another_distribution_cross_a_threshold(catalog, rows, other):
    spec = catalog["mnist"]
    counts = [60] * 10
    sent = {"inverted": 255 - rows["mnist"][:500], "fashion": rows["fashion"][:500],
            "one class only": rows["mnist"][:500]}[other]
    if other == "one class only":
        counts = [500] + [0] * 9
    crossed = above(serving_drift(sent, counts, spec, spec.reference.profile))
    expected = {"inverted": {"pixel_mean_shift", "mean_image_rmse"}, "fashion": {"pixel_mean_shift", "mean_image_rmse"},
                "one class only": {"predicted_class_kl"}}[other]
    assert expected <= crossed


def monitor_for(catalog, hold_s: float = 10, window: int = 300, told: list | None = None) -> DriftMonitor:
    spec = catalog["mnist"]
    monitor = DriftMonitor(spec, DriftSettings(window_rows=window, min_rows=100, hold_s=hold_s),
                           on_drift=told.append if told is not None else None)
    monitor.serve("v1", spec.reference.profile)
    return monitor


def test_the_window_keeps_the_newest_rows_in_bounded_memory(catalog, rows):
    monitor = monitor_for(catalog, window=300)
    sent = rows["mnist"][:700]
    for start in range(0, 700, 130):  # batches that wrap around the ring at different places
        batch = sent[start:start + 130]
        monitor.observe("v1", batch, np.arange(len(batch)) % 10)
    pixels, classes = monitor.window()
    assert pixels.shape == (300, NUM_PIXELS) and monitor._pixels.nbytes == 300 * NUM_PIXELS
    assert sorted(map(bytes, pixels)) == sorted(map(bytes, sent[-300:]))
    monitor.observe("v0", sent[:10], np.zeros(10, int))  # a request answered by the previous version
    assert len(monitor.window()[0]) == 300 and sorted(map(bytes, monitor.window()[0])) == sorted(map(bytes, sent[-300:]))


def test_a_drift_is_told_once_when_it_lasts_and_again_only_after_it_ended(catalog, rows):
    told = []
    monitor = monitor_for(catalog, hold_s=10, told=told)
    normal, inverted = rows["mnist"][:300], 255 - rows["mnist"][:300]
    monitor.observe("v1", normal, np.arange(300) % 10)
    assert monitor.evaluate(now=0) is None and not monitor.above_since
    monitor.observe("v1", inverted, np.arange(300) % 10)
    assert monitor.evaluate(now=100) is None, "crossed, but not yet for the hold time"
    assert monitor.evaluate(now=105) is None and told == []
    episode = monitor.evaluate(now=111)
    assert episode is not None and told == [episode] and "mean_image_rmse" in episode.statistics
    assert episode.version == "v1" and episode.above_since == 100
    assert monitor.evaluate(now=200) is None and len(told) == 1, "one episode, one notice"
    monitor.observe("v1", normal, np.arange(300) % 10)
    assert monitor.evaluate(now=300) is None and not monitor.in_episode
    monitor.observe("v1", inverted, np.arange(300) % 10)
    monitor.evaluate(now=400)
    assert monitor.evaluate(now=411) is not None and len(told) == 2 and monitor.status()["episodes"] == 2


def test_a_new_version_starts_an_empty_window_and_too_few_rows_are_not_scored(catalog, rows):
    monitor = monitor_for(catalog)
    monitor.observe("v1", 255 - rows["mnist"][:300], np.zeros(300, int))
    monitor.serve("v2", catalog["mnist"].reference.profile)
    assert monitor.window()[0].shape[0] == 0
    monitor.observe("v2", 255 - rows["mnist"][:50], np.zeros(50, int))
    assert monitor.evaluate(now=0) is None and monitor.status()["scores"] == {}


def test_a_failing_notice_does_not_stop_the_monitor(catalog, rows):
    def broken(episode):
        raise ConnectionError("webhook down")

    monitor = monitor_for(catalog, hold_s=0)
    monitor.on_drift = broken
    monitor.observe("v1", 255 - rows["mnist"][:300], np.zeros(300, int))
    assert monitor.evaluate(now=0) is not None and monitor.episodes == 1


def test_the_exposition_parses_and_counts_by_model_version_and_code(catalog, rows):
    spec = catalog["mnist"]
    champion = Champion("mnist", "/nowhere", 10)
    champion.current = Served("v7", lambda x: x, "mnist/v7/model.keras", "now")
    champion.swaps, champion.refusals, champion.registry_failures = 2, 1, 3
    monitor = monitor_for(catalog)
    monitor.serve("v7", spec.reference.profile)
    monitor.observe("v7", rows["mnist"][:300], np.arange(300) % 10)
    monitor.evaluate(now=0)
    metrics = ServerMetrics({"mnist": champion}, {"mnist": monitor}, {"mnist": list(spec.class_names)})
    for code in (200, 200, 400):
        metrics.answered("mnist", "v7", code, 0.01)
    metrics.predicted("mnist", "v7", np.array([3, 3, 5]))
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    requests = {(s.labels["version"], s.labels["code"]): s.value for s in families["train_mnist_inference_requests"].samples
                if s.name.endswith("_total")}
    assert requests == {("v7", "200"): 2, ("v7", "400"): 1}
    predicted = {s.labels["predicted_class"]: s.value for s in families["train_mnist_predictions"].samples
                 if s.name.endswith("_total")}
    assert predicted == {spec.class_names[3]: 2, spec.class_names[5]: 1}
    assert [s.labels for s in families["train_mnist_production_version_info"].samples] == [{"model": "mnist", "version": "v7"}]
    assert [s.value for s in families["train_mnist_model_swaps"].samples] == [2]
    assert [s.value for s in families["train_mnist_registry_retries"].samples] == [3]
    statistics = {s.labels["statistic"] for s in families["train_mnist_drift_score"].samples}
    assert "mean_image_rmse" in statistics


def test_sampling_keeps_about_its_share_in_parquet_with_the_splits_pixel_columns(tmp_path, rows):
    sampler = PredictionSampler(tmp_path / "samples", rate=0.25, seed=7)
    sent = rows["mnist"][:400]
    probabilities = np.eye(10, dtype=np.float32)[np.arange(400) % 10] * 0.9 + 0.01
    sampler.observe("mnist", "v3", sent, probabilities)
    written = sampler.flush()
    table = pq.read_table(written)
    assert 60 <= table.num_rows <= 140 and table.num_rows == sampler.sampled
    assert table.column_names[:5] == ["served_at", "model", "version", "predicted", "confidence"]
    assert table.column_names[5:] == list(PIXEL_COLUMNS)
    pixels = np.column_stack([table[c].to_numpy() for c in PIXEL_COLUMNS])
    sent_rows = {bytes(r): i for i, r in enumerate(sent)}
    indices = [sent_rows[bytes(r)] for r in pixels]
    assert table["predicted"].to_pylist() == [i % 10 for i in indices]
    assert set(table["version"].to_pylist()) == {"v3"}
    assert sampler.flush() is None, "nothing new: no empty file"


def test_the_sample_folder_stays_under_its_size_by_dropping_the_oldest_files(tmp_path, rows):
    limit = 600_000  # a file of 100 rows is ~250 KB: 789 columns of Parquet metadata
    sampler = PredictionSampler(tmp_path / "samples", rate=1.0, max_bytes=limit, seed=1)
    written = []
    for i in range(6):
        sampler.observe("mnist", "v1", rows["mnist"][i * 100:(i + 1) * 100], np.full((100, 10), 0.1, np.float32))
        written.append(sampler.flush())
    kept = sorted((tmp_path / "samples").glob("samples-*.parquet"))
    assert sum(f.stat().st_size for f in kept) <= limit and len(kept) >= 2
    assert kept == written[-len(kept):], "the newest files stay, the oldest go"


def test_sampling_memory_is_bounded_when_the_writer_lags(tmp_path, rows):
    sampler = PredictionSampler(tmp_path / "samples", rate=1.0, rows_per_file=100)
    for _ in range(5):
        sampler.observe("mnist", "v1", rows["mnist"][:100], np.full((100, 10), 0.1, np.float32))
    assert sampler._buffered_rows == 200 and sampler.dropped == 300


@pytest.mark.parametrize("rate", [0, -0.1, 1.5])
def test_a_sample_rate_outside_0_to_1_is_refused(tmp_path, rate):
    with pytest.raises(ValueError, match="sample-rate"):
        PredictionSampler(tmp_path, rate=rate)
