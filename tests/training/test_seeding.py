"""The same seed builds the same model whatever other threads of the process do with Python's global ``random``.

Prefect's event client (websockets) draws from it for every keepalive ping, in its own thread and at any moment, so
a ping can land between ``set_random_seed`` and the layers that Keras seeds from it (initializers, dropout).
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from tasks.training.architectures import build_model
from tasks.training.recipes import TrainConfig
from tasks.training.train import seed_everything


def initial_state(config: TrainConfig, draws_in_between: int) -> list[np.ndarray]:
    """Weights and dropout seed states of a model built right after seeding, with other draws in between."""
    seed_everything(config.seed)
    for _ in range(draws_in_between):
        random.getrandbits(32)  # what a websocket ping takes
    model = build_model(config, 10, steps_per_epoch=10)
    seeds = [layer.seed_generator.state.numpy() for layer in model.layers if hasattr(layer, "seed_generator")]
    return [np.asarray(w) for w in model.get_weights()] + seeds


@pytest.mark.parametrize("model", ["mlp", "cnn7"])
def test_draws_from_the_global_random_between_seeding_and_building_leave_the_model_unchanged(model):
    config = TrainConfig(model=model, epochs=1, seed=43)
    quiet, disturbed = initial_state(config, 0), initial_state(config, 3)
    assert all(np.array_equal(a, b) for a, b in zip(quiet, disturbed, strict=True))
    other_seed = initial_state(config.model_copy(update={"seed": 44}), 0)
    assert not all(np.array_equal(a, b) for a, b in zip(quiet, other_seed, strict=True)), "the seed must still matter"


def test_a_thread_drawing_all_the_time_leaves_the_model_unchanged_and_the_global_random_is_restored():
    import keras.src.random.seed_generator as keras_seeds

    config = TrainConfig(model="cnn7", epochs=1, seed=42)
    quiet = initial_state(config, 0)
    stop = threading.Event()
    pinger = threading.Thread(target=lambda: [random.getrandbits(32) for _ in iter(lambda: stop.wait(0.0005), True)])
    pinger.start()
    try:
        busy = [initial_state(config, 0) for _ in range(2)]
    finally:
        stop.set()
        pinger.join()
    assert all(np.array_equal(a, b) for state in busy for a, b in zip(quiet, state, strict=True))
    assert keras_seeds.python_random is random
