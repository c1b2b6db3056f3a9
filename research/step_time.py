"""The time side of the accuracy budget (issues 19 and 25): a candidate's training time as a ratio of the
baseline recipe's (each dataset's nightly recipe before the campaign, research/baselines.toml).

As the pipeline trains (deterministic ops): after a few warm-up steps that absorb tracing, each model's
median seconds per step, either in one process (three rounds of every model in turn) or, with
``--fresh N``, each model in a fresh process, N rounds in rotated order. On random rows of the real shape;
then scaled by the steps each recipe runs in a night (fit rows / batch size x planned epochs). A candidate
with ``mixed_bfloat16`` is timed as it trains (bfloat16 where the CPU has it); ``--policy mixed_bfloat16``
forces Keras's global policy on every candidate (a speed probe). The baseline is timed twice, the second
time as a control whose ratio says how much to trust the others.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FULL_TRAIN_ROWS = 60_000
WARMUP_STEPS = 5
ROUNDS = 3


def step_timer(config, steps: int, policy: str = "float32", num_classes: int = 10) -> Callable[[], float]:
    """A warmed-up model of ``config`` (network, augmentation, optimizer, batch size) built under the Keras
    dtype ``policy`` and the pipeline's own settings (deterministic TensorFlow ops: they change which kernels
    run), and a call that times one pass of ``steps`` training steps, returning seconds per step."""
    import keras

    from tasks.datasets import NUM_PIXELS
    from tasks.training.architectures import build_model
    from tasks.training.fitting import training_targets
    from tasks.training.train import seed_everything

    seed_everything(config.seed)
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(config.seed)
    rows = config.batch_size * steps
    x = rng.integers(0, 256, (rows, NUM_PIXELS)).astype(np.float32)
    y = training_targets(config, rng.integers(0, num_classes, rows), num_classes)  # one-hot with label smoothing
    model = build_model(config, num_classes, steps_per_epoch=steps)
    warm = config.batch_size * WARMUP_STEPS
    model.fit(x[:warm], y[:warm], batch_size=config.batch_size, epochs=1, verbose=0)
    keras.mixed_precision.set_global_policy("float32")

    def one_pass() -> float:
        start = time.perf_counter()
        model.fit(x, y, batch_size=config.batch_size, epochs=1, verbose=0, shuffle=False)
        return (time.perf_counter() - start) / steps

    return one_pass


def seconds_per_step(configs: dict[str, tuple[Any, str]], steps: int) -> dict[str, float]:
    """Seconds per step of each (config, policy): ``ROUNDS`` rounds that time every one once in turn, so a slow
    spell of the machine falls on all of them alike; each one's median over the rounds."""
    timers = {key: step_timer(config, steps, policy) for key, (config, policy) in configs.items()}
    passes: dict[str, list[float]] = {key: [] for key in configs}
    for _ in range(ROUNDS):
        for key, one_pass in timers.items():
            passes[key].append(one_pass())
    return {key: statistics.median(times) for key, times in passes.items()}


def _one_config_seconds_per_step(job: tuple[dict, str, int]) -> float:
    """In a fresh process: one config's median seconds per step over ``ROUNDS`` passes."""
    from tasks.training.recipes import TrainConfig

    fields, policy, steps = job
    one_pass = step_timer(TrainConfig(**fields), steps, policy)
    return statistics.median(one_pass() for _ in range(ROUNDS))


def fresh_seconds_per_step(configs: dict[str, tuple[Any, str]], steps: int, repeats: int) -> dict[str, float]:
    """Like ``seconds_per_step``, but each measurement in a fresh process (nothing one model's run leaves behind
    in the allocator, the thread pools or the traced graphs can slow the next one), the configs alternating
    ``repeats`` times, each round in a rotated order; each config's median over its repeats."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    times: dict[str, list[float]] = {key: [] for key in configs}
    for key in rotated_rounds(list(configs), repeats):
        config, policy = configs[key]
        with context.Pool(1, maxtasksperchild=1) as pool:
            times[key].append(pool.apply(_one_config_seconds_per_step, ((config.model_dump(), policy, steps),)))
    return {key: statistics.median(values) for key, values in times.items()}


def rotated_rounds(keys: list[str], repeats: int) -> list[str]:
    """``repeats`` rounds of every key, each round starting one key later: whatever slows the first process of
    a round (measured: the first one timed was slow in every round) falls on each key alike."""
    return [key for repeat in range(repeats) for key in keys[repeat % len(keys):] + keys[:repeat % len(keys)]]


def night_steps(config) -> int:
    """Training steps of ``config`` in a nightly run on the full train split, at its planned epochs."""
    from tasks.training.fitting import split_rows

    _, fit_idx = split_rows(config, config.train_rows or FULL_TRAIN_ROWS)
    return math.ceil(len(fit_idx) / config.batch_size) * config.epochs


BASELINES = Path(__file__).with_name("baselines.toml")


def baseline_recipes() -> dict:
    """Each dataset's nightly recipe before the accuracy campaign (research/baselines.toml), as a Recipe."""
    import tomllib

    from tasks.training.recipes import Recipe

    return {name: Recipe(**fields) for name, fields in tomllib.loads(BASELINES.read_text())["recipe"].items()}


def baseline_config(dataset: str):
    """The TrainConfig of ``dataset``'s baseline recipe."""
    from tasks.training.recipes import train_config_for

    return train_config_for(baseline_recipes()[dataset])


def time_ratios(candidates: list[dict[str, Any]], steps: int, policy: str = "float32",
                fresh_repeats: int = 0) -> list[dict[str, Any]]:
    """Each candidate's night of training in seconds, and as a ratio of its dataset's baseline recipe's
    (research/baselines.toml, timed in float32, as it trained)."""
    from tasks.training.recipes import TrainConfig

    todays = {dataset: baseline_config(dataset) for dataset in {c["dataset"] for c in candidates}}
    configs = {f"today:{dataset}": (config, "float32") for dataset, config in sorted(todays.items())}
    # Today's recipe once more, as a candidate: its ratio should be 1.0, and how far it is off is the noise.
    controls = [{"name": f"{dataset}: today's recipe again (control)", "dataset": dataset,
                 **todays[dataset].model_dump(exclude={"seed", "train_rows"})} for dataset in sorted(todays)]
    candidates = [*candidates, *controls]
    for candidate in candidates:
        fields = {k: v for k, v in candidate.items() if k not in ("name", "dataset")}
        configs[candidate["name"]] = (TrainConfig(**fields), "float32" if candidate in controls else policy)
    per_step = (fresh_seconds_per_step(configs, steps, fresh_repeats) if fresh_repeats
                else seconds_per_step(configs, steps))
    rows = []
    for candidate in candidates:
        config, dataset = configs[candidate["name"]][0], candidate["dataset"]
        today = per_step[f"today:{dataset}"] * night_steps(todays[dataset])
        night = per_step[candidate["name"]] * night_steps(config)
        rows.append({"name": candidate["name"], "dataset": dataset, "model": config.model,
                     "policy": configs[candidate["name"]][1],
                     "steps_per_s": round(1 / per_step[candidate["name"]], 2), "night_seconds": round(night, 1),
                     "todays_night_seconds": round(today, 1), "time_ratio": round(night / today, 3)})
    return rows


def whole_night(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With one candidate per dataset: the night of both datasets together (the budget may move between them),
    the candidates' and the controls', as ratios of today's night."""
    controls = [row for row in rows if "(control)" in row["name"]]
    candidates = [row for row in rows if row not in controls]
    if len({row["dataset"] for row in candidates}) != len(candidates) or len(candidates) != len(controls):
        return []
    today = sum(row["todays_night_seconds"] for row in controls)
    return [{"name": name, "night_seconds": round(sum(r["night_seconds"] for r in group), 1),
             "todays_night_seconds": round(today, 1),
             "time_ratio": round(sum(r["night_seconds"] for r in group) / today, 3)}
            for name, group in (("the night: candidates", candidates), ("the night: controls", controls))]

