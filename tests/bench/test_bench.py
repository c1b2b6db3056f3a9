"""The benchmark's own arithmetic and its frontier mode on a tiny configuration (no timings asserted)."""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import flops
from bench.fitclock import FitClock
from bench.run import PROJECT_ROOT, rows_for_steps
from research import frontier
from tasks.training.architectures import build_model
from tasks.training.recipes import TrainConfig


def test_forward_flops_follow_the_layer_formulas():
    mlp = build_model(TrainConfig(model="mlp"), 10)
    assert flops.model_forward_flops(mlp) == 2 * (784 * 512 + 512 * 512 + 512 * 10)

    cnn_bn = build_model(TrainConfig(model="cnn-bn"), 10)
    convs = 2 * 9 * (28 * 28 * (1 * 32 + 32 * 32) + 14 * 14 * (32 * 64 + 64 * 64))
    assert flops.model_forward_flops(cnn_bn) == convs + 2 * (7 * 7 * 64 * 128 + 128 * 10)


def test_tensorflow_profiler_agrees_with_the_layer_count():
    """The profiler also counts bias adds, normalisation and activations, so it is a little higher."""
    model = build_model(TrainConfig(model="cnn-bn", horizontal_flip=True), 10)
    counted, profiled = flops.model_forward_flops(model), flops.profiler_forward_flops(model)
    assert profiled is not None
    assert counted <= profiled <= 1.02 * counted


def test_matmul_rate_is_measured():
    rate = flops.matmul_flops_per_second(side=256, repeats=2)
    assert rate["flops_per_second"] > 0
    assert rate["flops_per_second"] == pytest.approx(2 * 256**3 / rate["best_seconds"])
    assert rate["flops_per_cpu_second"] > 0


def test_fit_clock_counts_samples_epochs_and_flops():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (600, 784)).astype(np.uint8), rng.integers(0, 10, 600)
    model = build_model(TrainConfig(model="mlp", epochs=2), 10)
    with FitClock().installed() as clock:
        model.fit(x[:500], y[:500], validation_data=(x[500:], y[500:]), epochs=2, batch_size=100, verbose=0)
    model.fit(x, y, epochs=1, verbose=0)  # after the context: not counted
    (call,) = clock.calls
    assert (call.train_samples, call.validation_samples, len(call.epoch_seconds)) == (1000, 200, 2)
    assert call.forward_flops == flops.model_forward_flops(model)
    measured = clock.utilization({"flops_per_second": 1e12, "flops_per_cpu_second": 1e12})
    assert measured["fit_flops_per_second"] == pytest.approx(call.forward_flops * (3 * 1000 + 200) / call.seconds)
    assert measured["cpu_utilization"] > 0
    assert clock.steady_utilization(1e12) is not None


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_rows_for_steps_leaves_whole_batches_after_the_hold_out(steps):
    rows = rows_for_steps(steps, 128, 0.1)
    assert rows - max(1, int(rows * 0.1)) == steps * 128


def test_budgets_round_half_up_to_at_least_one_epoch():
    assert [frontier.epochs_for(b, 12) for b in (0.01, 0.25, 0.5, 1.0)] == [1, 3, 6, 12]
    assert [frontier.epochs_for(b, 25) for b in (0.25, 0.5, 1.0)] == [6, 13, 25]


def test_bad_budgets_are_named():
    with pytest.raises(argparse.ArgumentTypeError, match="'half' is not a number"):
        frontier.parse_floats("0.5,half", "budgets", 0.0, 4.0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"0.0 is outside \(0.0, 4.0\]"):
        frontier.parse_floats("0", "budgets", 0.0, 4.0)


@pytest.mark.slow
def test_frontier_tiny_run_writes_table_json_and_plot(tmp_path):
    """The real CLI on 3,000 train rows and 10 % of mnist's nightly epochs (one epoch), full test split."""
    done = subprocess.run([sys.executable, "bench/run.py", "--frontier", "--datasets", "mnist", "--train-rows", "3000",
                           "--budgets", "0.1", "--seeds", "7", "--recipes", "baseline", "--frontier-dir", str(tmp_path)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "frontier.json").read_text())
    (point,) = report["points"]
    assert (point["dataset"], point["recipe_name"], point["model"], point["budget"], point["epochs"], point["seed"]) == (
        "mnist", "baseline", "cnn-bn", 0.1, 1, 7)
    assert point["test_rows"] == 10_000 and 0.0 <= point["test_accuracy"] <= 1.0
    assert point["cpu_minutes"] > 0 and point["wall_minutes"] > 0
    assert len(point["commit"]) == 40 and point["finished"].endswith("Z")  # which code measured it, and when
    (row,) = report["summary"]
    assert row["mean_accuracy"] == point["test_accuracy"]
    table = (tmp_path / "frontier.md").read_text()
    assert f"| mnist | baseline | cnn-bn | 0.1 | 1 | {100 * point['test_accuracy']:.2f} % | 7: " in table
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(Path(tmp_path).glob(".*tmp*"))  # atomic writes leave no temporary files

    # A second invocation keeps the measured point (same recipe) and adds the new seed's.
    again = subprocess.run([sys.executable, "bench/run.py", "--frontier", "--datasets", "mnist", "--train-rows", "3000",
                            "--budgets", "0.1", "--seeds", "7,8", "--recipes", "baseline", "--frontier-dir", str(tmp_path)],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "mnist baseline budget 0.1 seed 7: kept" in again.stdout
    report = json.loads((tmp_path / "frontier.json").read_text())
    assert [p["seed"] for p in report["points"]] == [7, 8] and report["points"][0] == point
    (row,) = report["summary"]
    assert row["mean_accuracy"] == pytest.approx((point["test_accuracy"] + report["points"][1]["test_accuracy"]) / 2)
    assert "7: " in (tmp_path / "frontier.md").read_text() and "8: " in (tmp_path / "frontier.md").read_text()


def test_frontier_drops_points_of_a_changed_recipe_and_keeps_both_recipes_apart(tmp_path):
    shipped, baseline = frontier.recipes_of("mnist", ["shipped"])["shipped"], frontier.recipes_of("mnist", ["baseline"])["baseline"]
    other = baseline.model_copy(update={"epochs": 3})  # stands in for a shipped recipe that differs from the baseline
    recipes = {"mnist": {frontier.recipe_key(r) for r in (shipped, baseline, other)}}
    meta = {"command": "test", "machine": {"cpus": 2, "cpu_model": "test"}}
    point = {"dataset": "mnist", "model": "cnn-bn", "budget": 0.5, "epochs": 6, "seed": 1, "train_rows": "all",
             "test_accuracy": 0.99, "cpu_minutes": 1.0, "wall_minutes": 1.0}
    frontier.merge_point(tmp_path, recipes, meta, dict(point, recipe=frontier.recipe_key(baseline), recipe_name="baseline"))
    frontier.merge_point(tmp_path, recipes, meta, dict(point, recipe=frontier.recipe_key(other), recipe_name="shipped",
                                                       test_accuracy=0.995))
    frontier.merge_point(tmp_path, recipes, meta, dict(point, seed=2, recipe="an older recipe"))
    report = frontier.merge_point(tmp_path, recipes, meta, None)
    assert sorted((p["recipe_name"], p["seed"]) for p in report["points"]) == [("baseline", 1), ("shipped", 1)]
    assert sorted((r["recipe_name"], r["mean_accuracy"]) for r in report["summary"]) == [("baseline", 0.99), ("shipped", 0.995)]
    assert "| mnist | baseline | cnn-bn | 0.5 |" in (tmp_path / "frontier.md").read_text()


def test_the_frontier_table_names_the_seeds_that_stopped_early():
    from research.frontier_report import summarize, table

    point = {"dataset": "fashion-mnist", "recipe": "r", "recipe_name": "baseline", "model": "cnn-bn", "budget": 1.5,
             "epochs": 38, "test_accuracy": 0.935, "cpu_minutes": 20.0, "wall_minutes": 15.0}
    summary = summarize([dict(point, seed=42, epochs_run=24), dict(point, seed=43, epochs_run=38),
                         dict(point, seed=44)])  # a point recorded before epochs_run was kept: ran them all
    (row,) = summary
    assert row["epochs_run"] == [24, 38, 38]
    assert "| 42: 93.50 (stopped after 24), 43: 93.50, 44: 93.50 |" in table(summary)[2]


def test_the_baseline_is_measured_once_while_it_is_still_the_shipped_recipe():
    both = frontier.recipes_of("fashion-mnist", ["shipped", "baseline"])
    baseline = frontier.recipes_of("fashion-mnist", ["baseline"])["baseline"]
    assert baseline.model == "cnn-bn" and baseline.epochs == 25  # tasks/datasets.toml's recipe before issue 25
    assert len(both) == (1 if frontier.recipe_key(both["shipped"]) == frontier.recipe_key(baseline) else 2)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown"):
        frontier.parse_recipe_sets("shipped,newest")


def test_nightly_seeds_average_the_accuracies_and_keep_the_cold_runs_wall(monkeypatch, tmp_path):
    import bench.nightly as nightly
    import bench.run as bench_run

    later = {43: {"mnist": 0.9950, "fashion-mnist": 0.9390}, 44: {"mnist": 0.9970, "fashion-mnist": 0.9420}}

    def fake_flow(work, mode, nightly=False, seed=42, cold=True, record=None):
        assert nightly and not cold
        return {"accuracy": later[seed], "flow_wall_seconds": 900.0}, tmp_path, None

    monkeypatch.setattr(nightly, "bench_flow", fake_flow)
    first = {"accuracy": {"mnist": 0.9960, "fashion-mnist": 0.9410}, "flow_wall_seconds": 1200.0,
             "details": {"seed": 42}}
    out = nightly.bench_more_seeds(tmp_path, first, [43, 44])
    assert out["mnist_accuracy"] == pytest.approx(0.996)
    assert out["fashion_mnist_accuracy"] == pytest.approx(0.94066666)
    assert out["nightly_wall_minutes"] == 20.0  # the first, cold run's; later runs reuse its cached data stages
    assert [run["seed"] for run in out["details"]["runs"]] == [42, 43, 44]
    assert out["details"]["spread"]["mnist"] == [0.995, 0.997]
    assert bench_run.verdict("mnist_accuracy", out["mnist_accuracy"])
    assert not bench_run.verdict("nightly_wall_minutes", 24.0)
    # Seeds from the record that ran cold in another session: the fastest cold run is the night's wall.
    recorded = {43: {"accuracy": later[43], "cold": True, "wall_seconds": 960.0, "finished": "earlier"}}
    out = nightly.bench_more_seeds(tmp_path, first, [43, 44], recorded)
    assert out["nightly_wall_minutes"] == 16.0 and [r["cold"] for r in out["details"]["runs"]] == [True, True, False]


def test_the_serving_load_counts_requests_rows_failures_and_nearest_rank_percentiles():
    from bench.serving import load, percentile

    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0 and percentile([1.0, 2.0], 0.99) == 2.0
    counter = itertools.count(1)  # next() is atomic: each call gets its own number, whichever thread makes it

    def send(http) -> None:
        if next(counter) % 4 == 0:
            raise RuntimeError("every fourth request fails")

    out = load(send, rows=256, seconds=0.3, clients=2)
    calls = next(counter) - 1
    assert out["requests"] + out["failures"] == calls and out["failures"] == calls // 4
    assert out["rows_per_s"] == pytest.approx(out["requests_per_s"] * 256)
    assert out["first_failures"][0] == "RuntimeError: every fourth request fails" and out["p99_ms"] >= out["p50_ms"]


def test_a_night_counts_the_steps_of_the_rows_left_after_the_hold_out():
    from research.step_time import night_steps

    assert night_steps(TrainConfig(model="cnn-bn", epochs=12)) == 422 * 12  # 54,000 fit rows in batches of 128
    assert night_steps(TrainConfig(model="cnn7", epochs=13, validation_fraction=0.0)) == 469 * 13  # all 60,000


def test_the_time_ratio_scales_seconds_per_step_by_each_recipes_night(monkeypatch, tmp_path):
    from research import screen, step_time

    per_step = {"cnn-bn": 0.02, "cnn7": 0.03}  # seconds per step, as if timed

    def timed(configs, steps):
        assert {key: policy for key, (_, policy) in configs.items()} == {
            "today:mnist": "float32", "mnist-cnn7": "mixed_bfloat16", "mnist: today's recipe again (control)": "float32"}
        return {key: per_step[config.model] for key, (config, _) in configs.items()}

    monkeypatch.setattr(step_time, "seconds_per_step", timed)
    monkeypatch.setattr(screen, "keep_record", lambda kind, record, folder=None: tmp_path / f"{kind}.json")
    candidate = {"name": "mnist-cnn7", "dataset": "mnist", "model": "cnn7", "epochs": 13, "validation_fraction": 0.0}
    row, control = step_time.time_ratios([candidate], steps=3, policy="mixed_bfloat16")
    assert control["time_ratio"] == 1.0 and control["policy"] == "float32"
    assert row["night_seconds"] == pytest.approx(0.03 * 469 * 13, abs=0.1)
    assert row["todays_night_seconds"] == pytest.approx(0.02 * 422 * 12, abs=0.1)  # mnist's recipe: cnn-bn, 12 epochs
    assert row["time_ratio"] == pytest.approx((0.03 * 469 * 13) / (0.02 * 422 * 12), abs=1e-3)
    assert screen.time_main([candidate], 3, "mixed_bfloat16") == 0


def test_seconds_per_step_times_each_model_in_rounds_under_its_policy():
    import keras

    from research.step_time import seconds_per_step

    configs = {"f32": (TrainConfig(model="mlp", batch_size=32), "float32"),
               "bf16": (TrainConfig(model="mlp", batch_size=32), "mixed_bfloat16")}
    times = seconds_per_step(configs, steps=3)
    assert set(times) == {"f32", "bf16"} and all(0 < t < 60 for t in times.values())
    assert keras.mixed_precision.global_policy().name == "float32"  # left as the pipeline needs it


def test_fresh_timing_rounds_start_each_with_the_next_model():
    from research.step_time import rotated_rounds

    order = rotated_rounds(["a", "b", "c"], 4)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert [order[i] for i in range(0, 12, 3)] == ["a", "b", "c", "a"]  # no model is always timed first


def test_the_whole_night_adds_both_datasets_and_checks_the_controls_the_same_way():
    from research.step_time import whole_night

    rows = [{"name": "m-new", "dataset": "mnist", "night_seconds": 400.0, "todays_night_seconds": 300.0},
            {"name": "f-new", "dataset": "fashion-mnist", "night_seconds": 600.0, "todays_night_seconds": 700.0},
            {"name": "mnist: today's recipe again (control)", "dataset": "mnist", "night_seconds": 310.0,
             "todays_night_seconds": 300.0},
            {"name": "fashion-mnist: today's recipe again (control)", "dataset": "fashion-mnist",
             "night_seconds": 690.0, "todays_night_seconds": 700.0}]
    candidates, controls = whole_night(rows)
    assert candidates == {"name": "the night: candidates", "night_seconds": 1000.0, "todays_night_seconds": 1000.0,
                          "time_ratio": 1.0}
    assert controls["night_seconds"] == 1000.0 and controls["time_ratio"] == 1.0
    assert whole_night(rows[:1] + rows[2:]) == []  # one candidate for two datasets: no whole night to compare


def test_each_default_run_is_appended_with_its_recipes_and_machine(tmp_path):
    import json

    from bench.nightly import append_default_run

    record = tmp_path / "default-runs.jsonl"
    for seed in (42, 43):
        append_default_run({"seed": seed, "accuracy": {"mnist": 0.99}}, record)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["seed"] for line in lines] == [42, 43]
    assert lines[0]["recipes"]["mnist"]["model"] and lines[0]["machine"]["cpu_model"] and lines[0]["commit"]


def test_resume_takes_recorded_seeds_of_the_same_recipes_on_the_same_cpu_and_runs_the_rest(monkeypatch, tmp_path):
    import json

    import bench.nightly as nightly

    record = tmp_path / "default-runs.jsonl"
    nightly.append_default_run({"seed": 42, "accuracy": {"mnist": 0.996}, "wall_seconds": 1800.0, "cold": True}, record)
    nightly.append_default_run({"seed": 43, "accuracy": {"mnist": 0.990}, "wall_seconds": 900.0, "cold": False}, record)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    other_cpu = dict(lines[1], machine=dict(lines[1]["machine"], cpu_model_number="999"))
    other_recipe = dict(lines[1], recipes={"mnist": {"model": "mlp"}})
    record.write_text("".join(json.dumps(line) + "\n" for line in (lines[0], other_cpu, other_recipe)) + "{torn")
    recorded = nightly.recorded_default_runs([42, 43, 44], record)
    assert set(recorded) == {42}  # 43 trained another recipe or on another CPU

    ran = []

    def fake_flow(work, mode, nightly=False, seed=42, cold=True, record=None):
        assert record == tmp_path / "default-runs.jsonl"
        ran.append(seed)
        return {"accuracy": {"mnist": 0.994}, "flow_wall_seconds": 600.0}, tmp_path, None

    monkeypatch.setattr(nightly, "bench_flow", fake_flow)
    out = nightly.bench_more_seeds(tmp_path, None, [42, 43, 44], recorded, record)
    assert ran == [43, 44] and out["mnist_accuracy"] == pytest.approx((0.996 + 0.994 + 0.994) / 3)
    assert out["nightly_wall_minutes"] == 30.0 and out["details"]["runs"][0]["from_record"]



def test_the_budget_counts_a_nights_training_flops_against_the_previous_recipes():
    from bench.flops import model_forward_flops
    from research.budget import flops_against_baseline, night_training_flops
    from research.step_time import baseline_config
    from tasks.training.architectures import build_model

    cnn_bn = model_forward_flops(build_model(TrainConfig(model="cnn-bn"), 10))
    assert night_training_flops(baseline_config("mnist")) == 3 * cnn_bn * 54_000 * 12  # 10 % held out, 12 epochs
    flops = flops_against_baseline()
    assert set(flops["per_dataset"]) == {"mnist", "fashion-mnist"}
    for row in flops["per_dataset"].values():
        assert row["ratio"] == pytest.approx(row["shipped"] / row["baseline"], abs=1e-3)
    night = flops["night"]
    assert night["baseline"] == sum(row["baseline"] for row in flops["per_dataset"].values())
    assert night["ratio"] == pytest.approx(night["shipped"] / night["baseline"], abs=1e-3)


def test_the_nightly_budget_step_records_the_time_ratio_and_the_controls(monkeypatch):
    from bench.nightly import bench_budget
    from research import step_time
    from research.budget import shipped_configs

    def timed(configs, steps, repeats):
        assert repeats == 2 and set(configs) == {
            "today:mnist", "today:fashion-mnist", "mnist: shipped recipe", "fashion-mnist: shipped recipe",
            "mnist: today's recipe again (control)", "fashion-mnist: today's recipe again (control)"}
        # Every shipped step costs half a baseline step; the controls come out 10 % slow.
        return {key: 0.01 if "shipped" in key else 0.022 if "control" in key else 0.02 for key in configs}

    monkeypatch.setattr(step_time, "fresh_seconds_per_step", timed)
    out = bench_budget(2)
    shipped = sum(step_time.night_steps(config) for config in shipped_configs().values())
    baseline = sum(step_time.night_steps(step_time.baseline_config(name)) for name in ("mnist", "fashion-mnist"))
    assert out["night_time_ratio"] == pytest.approx((0.01 * shipped) / (0.02 * baseline), abs=1e-3)
    assert out["control_time_ratio"] == pytest.approx(1.1, abs=1e-3)
    assert out["details"]["time"]["trusted"] is False  # a control 10 % off: the measurement is not to be used
    assert out["training_flops_ratio"] == out["details"]["flops"]["night"]["ratio"]
    assert "night_time_ratio" not in bench_budget(0)  # FLOPs only, nothing timed


def test_readme_shows_the_committed_frontier_and_the_report_tool_rewrites_only_the_table(tmp_path):
    from research.frontier_report import TABLE_HEADER, table, table_in, write_table_into

    summary = json.loads((PROJECT_ROOT / "bench" / "frontier.json").read_text())["summary"]
    assert table_in((PROJECT_ROOT / "README.md").read_text()) == table(summary), (
        "README's frontier table differs from bench/frontier.json: python -m research.frontier_report")

    readme = tmp_path / "README.md"
    readme.write_text(f"# Models\n\nBefore.\n\n{TABLE_HEADER}\n|---|\n| old | row |\n\nAfter.\n")
    assert write_table_into(readme, summary) is True
    text = readme.read_text()
    assert text.startswith("# Models\n\nBefore.\n\n") and text.endswith("\n\nAfter.\n") and "| old | row |" not in text
    assert table_in(text) == table(summary)
    assert write_table_into(readme, summary) is False
    readme.write_text("no table here\n")
    with pytest.raises(ValueError, match="no frontier table"):
        write_table_into(readme, summary)
