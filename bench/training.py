"""Benchmarks of training: the pipeline's training stage against a bare Keras script, and the nightly recipes'
FLOPs utilization."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import flops
from bench.common import PROJECT_ROOT, Mode, timed
from bench.fitclock import FitClock

BARE_FIT_SCRIPT = Path(__file__).with_name("run.py")


def training_config(mode: Mode):
    """The config the flow trains mnist's mlp with, for ``mode``'s epochs and rows."""
    from tasks.datasets import load_catalog
    from tasks.training.recipes import train_config_for

    return train_config_for(load_catalog()["mnist"].recipe, "mlp", mode.epochs, 42, mode.train_rows)


def bare_fit(parquet: Path, config_json: str, deterministic: bool = False) -> dict[str, float]:
    """What a newcomer would write: read the Parquet file, build the same model, fit it. Runs in its own process."""
    import math

    import numpy as np

    from tasks.model_io import import_keras
    from tasks.training.architectures import build_model
    from tasks.training.fitting import split_rows, training_targets
    from tasks.training.recipes import TrainConfig

    config = TrainConfig.model_validate_json(config_json)
    import_seconds, keras = timed(import_keras)
    keras.utils.set_random_seed(config.seed)
    if deterministic:  # diagnostic only: the pipeline's seed_everything also turns on op determinism
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    start = time.perf_counter()
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)  # as a newcomer would read it, not through the pipeline's reader
    if config.train_rows is not None:
        table = table.slice(0, config.train_rows)
    data = np.column_stack([c.to_numpy() for c in table.columns])
    x, y = data[:, 1:], training_targets(config, data[:, 0].astype(np.int64), 10)
    val, fit = split_rows(config, len(y))
    model = build_model(config, 10, steps_per_epoch=math.ceil(len(fit) / config.batch_size))
    fit_start = time.perf_counter()
    history = model.fit(x[fit], y[fit], validation_data=(x[val], y[val]) if len(val) else None, epochs=config.epochs,
                        batch_size=config.batch_size, shuffle=True, verbose=0)
    end = time.perf_counter()
    return {"seconds": end - start, "fit_seconds": end - fit_start, "samples": len(fit) * len(history.epoch),
            "import_seconds": import_seconds}


def run_bare_fit(parquet: Path, config, deterministic: bool = False) -> dict[str, float]:
    """The bare script in a fresh interpreter, so none of the pipeline's settings (op determinism) leak in."""
    argv = [sys.executable, str(BARE_FIT_SCRIPT), "--bare-fit", str(parquet), config.model_dump_json(),
            "deterministic" if deterministic else "plain"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bare Keras fit failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_training(work: Path, parquet: Path, mode: Mode) -> dict[str, Any]:
    """train_model (the pipeline's training stage, whole call) against the bare script; fastest of each side."""
    from tasks.model_io import import_keras
    from tasks.training.train import train_model

    import_keras()
    config = training_config(mode)
    pipeline, bare = [], []
    for i in range(mode.slow_repeats):
        bare.append(run_bare_fit(parquet, config))
        with FitClock().installed() as clock:
            seconds, _ = timed(lambda i=i: train_model(parquet, 10, config, work / f"train-{i}"))
        pipeline.append({"seconds": seconds, "fit_seconds": clock.seconds, "samples": clock.samples})
    def rate(run: dict[str, float], clock: str = "seconds") -> float:
        return run["samples"] / run[clock]

    best_pipeline, best_bare = max(pipeline, key=rate), max(bare, key=rate)
    ratio = rate(best_pipeline) / rate(best_bare)
    fit_ratio = rate(best_pipeline, "fit_seconds") / rate(best_bare, "fit_seconds")
    deterministic = run_bare_fit(parquet, config, deterministic=True)  # where a lost share goes, once
    vs_deterministic = rate(best_pipeline) / rate(deterministic)
    return {"training_throughput_ratio": ratio,
            "details": {"pipeline": best_pipeline, "bare": best_bare, "fit_only_ratio": fit_ratio,
                        "bare_with_op_determinism": deterministic, "ratio_vs_bare_with_op_determinism": vs_deterministic,
                        "epochs": mode.epochs, "train_rows": mode.train_rows or "all"}}


def rows_for_steps(steps: int, batch_size: int, validation_fraction: float) -> int:
    """Train rows whose fit part (after train_model's hold-out) is exactly ``steps`` full batches."""
    def held_out(rows: int) -> int:  # as tasks.training.train.split_rows
        return max(1, int(rows * validation_fraction)) if validation_fraction else 0

    rows = math.ceil(steps * batch_size / (1 - validation_fraction))
    while rows - held_out(rows) > steps * batch_size:
        rows -= 1
    return rows


def bench_recipe_fits(work: Path, parquets: dict[str, Path], steps: int) -> FitClock:
    """Each dataset's nightly recipe through train_model for 2 epochs of ``steps`` full batches (utilization only)."""
    from tasks.datasets import load_catalog
    from tasks.training.recipes import TrainConfig, train_config_for
    from tasks.training.train import train_model

    batch = TrainConfig.model_fields["batch_size"].default
    with FitClock().installed() as clock:
        for name, spec in load_catalog().items():
            rows = rows_for_steps(steps, batch, spec.recipe.validation_fraction)
            config = train_config_for(spec.recipe, epochs=2, train_rows=rows)
            with clock.labelled(f"{name}-{config.model}"):
                train_model(parquets[name], spec.num_classes, config, work / f"recipe-{name}")
    return clock


def flops_utilization(clock: FitClock, matmul: dict[str, float], source: str) -> dict[str, Any]:
    """training_flops_utilization over all of ``clock``'s fits, and per training run."""
    rate = matmul["flops_per_second"]
    per_run = {label: {**clock.utilization(matmul, label), "steady_utilization": clock.steady_utilization(rate, label)}
               for label in clock.labels()}
    overall = clock.utilization(matmul)
    return {"training_flops_utilization": overall["utilization"],
            "details": {"source": source, "matmul": matmul, **overall,
                        "steady_utilization": clock.steady_utilization(rate), "per_run": per_run,
                        "train_step_forward_multiple": flops.TRAIN_STEP_FORWARD_MULTIPLE}}
