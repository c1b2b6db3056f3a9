"""Floating-point work: a Keras model's FLOPs per sample, and the machine's float32 matmul rate.

``training_flops_utilization`` = (FLOPs that ``fit`` did) / (fit seconds) / (matmul FLOP/s). Only the
layers that are matrix products are counted (Dense and the convolutions): they are nearly all the
arithmetic, and what a matmul-bound peak can be compared with. Normalisation, activations, pooling,
dropout and the augmentation layers count as zero, so the time they take lowers the utilization,
which is the point: it shows where the time goes besides the arithmetic.
"""

from __future__ import annotations

import math
import time
from typing import Any

# One backward pass costs about two forward passes (gradients with respect to the inputs and to the
# weights), so a training step is ~3x the forward FLOPs; validation inside fit is forward only.
TRAIN_STEP_FORWARD_MULTIPLE = 3
MATMUL_SIDE = 2048  # 2 x 2048^3 = 17 GFLOP per product: long enough to time, large enough to be compute-bound


def _shape(tensor_shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in tuple(tensor_shape)[1:])  # drop the batch axis


def layer_forward_flops(layer: Any) -> int:
    """Forward FLOPs of one sample through ``layer`` (multiply and add counted as 2); 0 unless a matrix product."""
    kind = type(layer).__name__
    if kind == "Dense":
        units_in = _shape(layer.input.shape)[-1]
        out = _shape(layer.output.shape)
        return 2 * math.prod(out[:-1]) * units_in * layer.units
    if kind in ("Conv1D", "Conv2D", "Conv3D"):
        channels_in = _shape(layer.input.shape)[-1 if layer.data_format == "channels_last" else 0]
        out = _shape(layer.output.shape)
        positions = math.prod(out[:-1] if layer.data_format == "channels_last" else out[1:])
        return 2 * positions * math.prod(layer.kernel_size) * (channels_in // layer.groups) * layer.filters
    if kind == "DepthwiseConv2D":
        out = _shape(layer.output.shape)
        return 2 * math.prod(out) * math.prod(layer.kernel_size)
    if kind == "SeparableConv2D":
        channels_in = _shape(layer.input.shape)[-1]
        out = _shape(layer.output.shape)
        positions = math.prod(out[:-1])
        depthwise = 2 * positions * math.prod(layer.kernel_size) * channels_in * layer.depth_multiplier
        return depthwise + 2 * positions * channels_in * layer.depth_multiplier * layer.filters
    return 0


def model_forward_flops(model: Any) -> int:
    """Forward FLOPs per sample of a functional Keras model, nested models included."""
    total = 0
    for layer in model.layers:
        total += model_forward_flops(layer) if hasattr(layer, "layers") else layer_forward_flops(layer)
    return total


def _tensorflow():
    from tasks.model_io import import_keras

    import_keras()  # TensorFlow imported the pipeline's way, without its start-up banner
    import tensorflow as tf

    return tf


def profiler_forward_flops(model: Any) -> int | None:
    """Forward FLOPs per sample by TensorFlow's graph profiler, as a cross-check; None if it cannot count them."""
    tf = _tensorflow()

    spec = tf.TensorSpec((1, *model.input_shape[1:]), model.inputs[0].dtype)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    try:
        profile = tf.compat.v1.profiler.profile(graph, options=options)
    except Exception:  # noqa: BLE001 - the profiler is optional; the layer count is the metric
        return None
    return int(profile.total_float_ops) if profile is not None else None


def matmul_flops_per_second(side: int = MATMUL_SIDE, repeats: int = 5) -> dict[str, float]:
    """Best float32 ``side x side`` matmul rate of TensorFlow (the kernels training uses), after one warm-up."""
    tf = _tensorflow()

    rng = tf.random.Generator.from_seed(0)
    a = rng.normal((side, side), dtype=tf.float32)
    b = rng.normal((side, side), dtype=tf.float32)
    tf.linalg.matmul(a, b).numpy()  # warm-up: thread pools, kernel choice
    best, best_cpu = math.inf, math.inf
    for _ in range(repeats):
        cpu, start = time.process_time(), time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    flops = 2 * side**3
    # Per CPU second too: on a shared machine other processes take cores away, which lowers the wall rate
    # of the matmul and of training at different moments, but the rate per CPU second much less.
    return {"flops_per_second": flops / best, "flops_per_cpu_second": flops / best_cpu, "side": side,
            "best_seconds": best, "best_cpu_seconds": best_cpu, "repeats": repeats}


def fit_flops(forward_flops: int, train_samples: int, validation_samples: int) -> int:
    """FLOPs ``fit`` did: training steps at ~3x the forward cost, validation at 1x."""
    return forward_flops * (TRAIN_STEP_FORWARD_MULTIPLE * train_samples + validation_samples)
