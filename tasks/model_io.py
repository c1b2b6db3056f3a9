"""The one place models are saved, loaded and scored.

A saved model takes a batch of raw rows, shape (N, 784), pixel values 0..255 in CSV order, and returns
class probabilities. Loading always uses Keras safe mode: no arbitrary code from the file runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks import storage

PREDICT_BATCH = 2048  # rows per forward pass wherever a model is scored: the same batches give the same numbers


def import_keras():
    """Import Keras (TensorFlow backend) with TensorFlow's C++ start-up banner kept out of the run's output.

    TensorFlow 2.21 prints its oneDNN/absl banner from C++ at import, past TF_CPP_MIN_LOG_LEVEL, so
    stderr's file descriptor is pointed at /dev/null for the import only.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":  # research/screen.py on a JAX machine
        import keras

        return keras
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import keras
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return keras


def save_model(model, dest: Path) -> Path:
    """Save ``model`` as a ``.keras`` file, atomically."""
    with storage.atomic_path(Path(dest), suffix=storage.TMP_SUFFIX + ".keras") as tmp:  # Keras insists on the extension
        model.save(tmp)
    return Path(dest)


def load_model(path: Path):
    """Load a saved model with Keras safe mode on: no arbitrary code from the file runs."""
    keras = import_keras()
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def score(model, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) of a loaded model on raw pixel rows, in ``PREDICT_BATCH``-row batches.

    Evaluation, the champion comparison, the canary and ``predict`` all score through here, so the same
    model and rows give the same probabilities in each.
    """
    return np.asarray(model.predict(np.asarray(pixels, np.float32), batch_size=PREDICT_BATCH, verbose=0),
                      dtype=np.float64)


def compiled_forward(model) -> Callable[[np.ndarray], np.ndarray]:
    """``model``'s inference pass as one traced graph for any number of rows, warmed up: what a server calls
    per request. Calling the model eagerly runs every layer as a separate op, which costs more than the
    arithmetic for small requests (five times over for a model that averages test-time views)."""
    import tensorflow as tf

    from tasks.datasets import NUM_PIXELS

    graph = tf.function(lambda x: model(x, training=False),
                        input_signature=[tf.TensorSpec([None, NUM_PIXELS], tf.float32)])

    def forward(pixels: np.ndarray) -> np.ndarray:
        return graph(tf.convert_to_tensor(pixels, tf.float32)).numpy()

    forward(np.zeros((1, NUM_PIXELS), np.float32))  # trace now, not on the first request
    return forward


def predict_probabilities(model_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) of the saved model on raw pixel rows."""
    return score(load_model(model_path), pixels)


def predict_classes(model_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Predicted classes of the saved model on raw pixel rows."""
    return predict_probabilities(model_path, pixels).argmax(axis=1)
