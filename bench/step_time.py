"""The time side of issue 19's budget: a candidate's training time as a ratio of today's nightly recipe's.

Both are timed in one process on one machine: an equal number of training steps of each (after a few
warm-up steps that absorb tracing), on random rows of the real shape, then scaled by the steps each recipe
runs in a night (fit rows / batch size x planned epochs). ``--policy mixed_bfloat16`` times the candidates
under Keras's bf16 policy against today's recipes in float32 (a speed probe only: the recipes train in float32).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

FULL_TRAIN_ROWS = 60_000
WARMUP_STEPS = 5


def seconds_per_step(config, steps: int, num_classes: int = 10) -> float:
    """Wall seconds per training step of ``config``'s network and augmentation, batch ``config.batch_size``."""
    import keras

    from tasks.architectures import build_model

    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    rows = config.batch_size * steps
    x = rng.integers(0, 256, (rows, 784)).astype(np.float32)
    y = rng.integers(0, num_classes, rows)
    model = build_model(config, num_classes, steps_per_epoch=steps)
    warm = config.batch_size * WARMUP_STEPS
    model.fit(x[:warm], y[:warm], batch_size=config.batch_size, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=config.batch_size, epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / steps


def night_steps(config) -> int:
    """Training steps of ``config`` in a nightly run on the full train split, at its planned epochs."""
    from tasks.fitting import split_rows

    _, fit_idx = split_rows(config, config.train_rows or FULL_TRAIN_ROWS)
    return math.ceil(len(fit_idx) / config.batch_size) * config.epochs


def time_ratios(candidates: list[dict[str, Any]], steps: int, policy: str = "float32") -> list[dict[str, Any]]:
    """Each candidate's night of training in seconds, and as a ratio of its dataset's nightly recipe's."""
    import keras

    from tasks.datasets import TrainConfig, load_catalog, train_config_for

    catalog = load_catalog()
    baselines = {}
    keras.mixed_precision.set_global_policy("float32")  # today's recipes, as they train
    for dataset in sorted({c["dataset"] for c in candidates}):
        config = train_config_for(catalog[dataset].recipe)
        baselines[dataset] = seconds_per_step(config, steps) * night_steps(config)
    keras.mixed_precision.set_global_policy(policy)
    rows = []
    for candidate in candidates:
        config = TrainConfig(**{k: v for k, v in candidate.items() if k not in ("name", "dataset")})
        per_step = seconds_per_step(config, steps)
        night = per_step * night_steps(config)
        rows.append({"name": candidate["name"], "dataset": candidate["dataset"], "model": config.model,
                     "policy": policy, "steps_per_s": round(1 / per_step, 2), "night_seconds": round(night, 1),
                     "todays_night_seconds": round(baselines[candidate["dataset"]], 1),
                     "time_ratio": round(night / baselines[candidate["dataset"]], 3)})
    return rows
