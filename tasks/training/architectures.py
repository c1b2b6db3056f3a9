"""The model architectures train-mnist trains, and the test-time views a saved model may average over.

Every model takes raw rows, shape (N, 784), pixels 0..255, and returns class probabilities; it scales
and (in training only) augments the pixels itself, so the saved ``model.keras`` needs nothing else.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.datasets import IMAGE_SHAPE, NUM_PIXELS
from tasks.model_io import import_keras
from tasks.training.recipes import TrainConfig


def build_model(config: TrainConfig, num_classes: int, steps_per_epoch: int | None = None):
    """A compiled Keras model over raw 0..255 pixel rows (augmentation layers act in training only).

    - ``mlp``: the seeds' baseline, Dense 512-512 with dropout.
    - ``cnn``: small convnet (conv32-pool-conv64-pool-dense128, ~225K parameters).
    - ``cnn-bn``: conv32x2-pool-conv64x2-pool-dense128 with batch normalisation (~470K parameters).
    - ``cnn7``: seven convolutions with batch normalisation, strided instead of pooled (~0.8x cnn-bn's FLOPs).
    - ``vgg``: three VGG stages with batch normalisation and global average pooling (~1.5x cnn-bn's FLOPs).

    ``steps_per_epoch`` sizes the learning-rate schedule and, for short runs, the batch normalisation momentum;
    ``None`` (a model that is not trained, such as a float32 twin) gives one step and Keras' momentum.
    """
    with keras_default_seeds(config.seed):
        return _build_model(config, num_classes, steps_per_epoch)


_KERAS_SEEDS_LOCK = threading.RLock()


@contextmanager
def keras_default_seeds(seed: int) -> Iterator[None]:
    """Layers built inside draw the seeds Keras gives unseeded initializers and dropout from a generator of their own.

    Keras draws them from Python's global ``random``, which other threads draw from too: the websockets under
    Prefect's event client take a number for every keepalive ping. One ping between ``set_random_seed`` and the
    layers gave the same seed other initial weights (seed 43's mnist: 99.70 % once in a long-lived process, 99.58 %
    in fresh ones). The generator is seeded as ``set_random_seed`` seeds the global one, so a model built right
    after it gets the same weights as before, now whatever other threads do.
    """
    from keras.src.random import seed_generator

    with _KERAS_SEEDS_LOCK:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


def _build_model(config: TrainConfig, num_classes: int, steps_per_epoch: int | None):
    keras = import_keras()
    layers = keras.layers

    inputs = keras.Input(shape=(NUM_PIXELS,), name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    if config.model == "mlp":
        for units in (512, 512):
            x = layers.Dense(units, activation="relu")(x)
            x = layers.Dropout(0.2)(x)
    else:
        x = layers.Reshape((*IMAGE_SHAPE, 1))(x)
        if config.horizontal_flip:
            x = layers.RandomFlip("horizontal", seed=config.seed)(x)
        if config.rotate:
            x = layers.RandomRotation(config.rotate, interpolation=config.interpolation, fill_mode="constant", seed=config.seed)(x)
        if config.zoom:
            x = layers.RandomZoom(config.zoom, interpolation=config.interpolation, fill_mode="constant", seed=config.seed)(x)
        if config.translate:
            x = layers.RandomTranslation(config.translate, config.translate, interpolation=config.interpolation, fill_mode="constant", seed=config.seed)(x)
        if config.erase:
            x = layers.RandomErasing((config.erase, config.erase), fill_value=0.0, value_range=(0, 1), seed=config.seed)(x)
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(training_dtype_policy(config))
        try:
            momentum = 0.99 if steps_per_epoch is None else batchnorm_momentum(config.epochs * steps_per_epoch)
            x = CONVNETS[config.model](layers, x, momentum)
        finally:
            keras.config.set_dtype_policy(previous)
    # float32 (the layers' default) even under mixed bfloat16: the softmax and the loss need the precision.
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"train_mnist_{config.model.replace('-', '_')}")
    # Label smoothing needs one-hot targets (training_targets gives them); without it the labels stay as they are.
    loss = (keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing) if config.label_smoothing
            else keras.losses.SparseCategoricalCrossentropy())
    model.compile(optimizer=build_optimizer(config, steps_per_epoch or 1), loss=loss, metrics=["accuracy"])
    return model


def batchnorm_momentum(training_steps: int) -> float:
    """Keras' default 0.99, or less for a run too short for it.

    Inference uses the moving statistics, which keep ``momentum ** steps`` of their initial values (mean 0,
    variance 1): 62 % after 47 steps at 0.99, enough to leave a seven-layer net at chance. A time constant of at
    most a tenth of the run leaves under e**-10 of them; runs of 1,000 steps or more keep 0.99.
    """
    return min(0.99, max(0.0, 1.0 - 10.0 / max(training_steps, 1)))


def training_dtype_policy(config: TrainConfig) -> str:
    """The convnet body's Keras dtype policy: ``mixed_bfloat16`` where the recipe asks for it and the CPU computes
    bfloat16 natively (elsewhere it is emulated, slower than float32), else ``float32``."""
    if config.mixed_bfloat16 and config.model != "mlp" and native_bfloat16():
        return "mixed_bfloat16"
    return "float32"


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot products (AVX512_BF16 or AMX-BF16), from /proc/cpuinfo (Linux)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def as_float32(model, config: TrainConfig, num_classes: int):
    """``model`` itself if it computes in float32, else the same network built in float32 with its weights
    (mixed bfloat16 keeps every weight in float32, so nothing is rounded): the model that is saved and scored."""
    if training_dtype_policy(config) == "float32":
        return model
    twin = build_model(config.model_copy(update={"mixed_bfloat16": False}), num_classes)
    twin.set_weights(model.get_weights())
    # Built like a trained model's optimizer: otherwise every load of the saved file warns that the optimizer
    # it builds has more variables than the file holds.
    twin.optimizer.build(twin.trainable_variables)
    return twin


def build_optimizer(config: TrainConfig, steps_per_epoch: int):
    """The recipe's optimizer: cosine decay to 0 after an optional linear warm-up, decoupled weight decay, and
    (``ema`` > 0) a moving average of the weights kept beside them (``tasks.training.train`` saves the average)."""
    keras = import_keras()
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = max(config.epochs * steps_per_epoch - warmup, 1)
    schedule = (keras.optimizers.schedules.CosineDecay(0.0, total, warmup_target=config.learning_rate,
                                                       warmup_steps=warmup) if warmup else
                keras.optimizers.schedules.CosineDecay(config.learning_rate, total))
    common = {"learning_rate": schedule, "weight_decay": config.weight_decay or None,
              "use_ema": config.ema > 0, "ema_momentum": config.ema or 0.99}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=0.9, nesterov=True, **common)
    return keras.optimizers.Adam(**common)


SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows down, columns right), one pixel each way


def with_test_time_views(model, views: str):
    """``model`` wrapped so that it averages its probabilities over views of each image, built from standard layers.

    ``flip``: the image and its mirror; ``shifts``: the image and its four 1-pixel shifts; ``flip-shifts``: the
    image, its mirror and the four 1-pixel shifts of each (ten views). Inputs and outputs
    are unchanged (raw rows in, probabilities out), so whoever loads ``model.keras`` gets the views too.
    """
    if views == "none":
        return model
    keras = import_keras()
    layers = keras.layers
    inputs = keras.Input(shape=(NUM_PIXELS,), name="pixels")
    image = layers.Reshape((*IMAGE_SHAPE, 1), name="image")(inputs)
    mirrored = keras.ops.flip(image, axis=2)
    others = {"flip": [mirrored],
              "shifts": [_shifted(layers, image, down, right) for down, right in SHIFTS],
              "flip-shifts": [mirrored] + [_shifted(layers, view, down, right) for view in (image, mirrored)
                                           for down, right in SHIFTS]}[views]
    flat = [inputs] + [layers.Reshape((NUM_PIXELS,))(view) for view in others]
    outputs = layers.Average(name="probabilities")([model(view) for view in flat])
    return keras.Model(inputs, outputs, name=f"{model.name}_{views}_views")


def _shifted(layers, image, down: int, right: int):
    """The image moved by (down, right) pixels, zeros coming in, same size."""
    pad = ((max(down, 0), max(-down, 0)), (max(right, 0), max(-right, 0)))
    crop = ((max(-down, 0), max(down, 0)), (max(-right, 0), max(right, 0)))
    return layers.Cropping2D(crop)(layers.ZeroPadding2D(pad)(image))


def _conv_bn(layers, x, momentum: float, filters: int, size: int, strides: int = 1, padding: str = "same"):
    x = layers.Conv2D(filters, size, strides=strides, padding=padding, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=momentum)(x)
    return layers.Activation("relu")(x)


def _small_convnet(layers, x, momentum: float):
    """conv32-pool-conv64-pool-dense128 (~225K parameters; no batch normalisation, so ``momentum`` is unused)."""
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Dense(128, activation="relu")(layers.Flatten()(x))
    return layers.Dropout(0.5)(x)


def _batchnorm_convnet(layers, x, momentum: float):
    """conv32x2-pool-conv64x2-pool-dense128 with batch normalisation (~470K parameters)."""
    for filters in (32, 64):
        for _ in range(2):
            x = _conv_bn(layers, x, momentum, filters, 3)
        x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.3)(layers.Flatten()(x))
    x = layers.Dense(128, activation="relu")(x)
    return layers.Dropout(0.3)(x)


def _seven_conv_net(layers, x, momentum: float):
    """32C3-32C3-32C5S2-64C3-64C3-64C5S2-128C4 with batch normalisation and dropout 0.4 (~0.8x cnn-bn's FLOPs);
    the MNIST net of github.com/cdeotte/MNIST-CNN-99.75."""
    x = _conv_bn(layers, x, momentum, 32, 3, padding="valid")
    x = _conv_bn(layers, x, momentum, 32, 3, padding="valid")
    x = layers.Dropout(0.4)(_conv_bn(layers, x, momentum, 32, 5, strides=2))
    x = _conv_bn(layers, x, momentum, 64, 3, padding="valid")
    x = _conv_bn(layers, x, momentum, 64, 3, padding="valid")
    x = layers.Dropout(0.4)(_conv_bn(layers, x, momentum, 64, 5, strides=2))
    x = _conv_bn(layers, x, momentum, 128, 4, padding="valid")
    return layers.Dropout(0.4)(layers.Flatten()(x))


def _vgg_gap_net(layers, x, momentum: float):
    """Three VGG stages (32-32 / 64-64 / 128-128, batch normalisation) and global average pooling (~1.5x cnn-bn)."""
    for filters in (32, 64, 128):
        x = _conv_bn(layers, x, momentum, filters, 3)
        x = _conv_bn(layers, x, momentum, filters, 3)
        if filters != 128:
            x = layers.MaxPooling2D()(x)
    return layers.Dropout(0.3)(layers.GlobalAveragePooling2D()(x))


CONVNETS = {"cnn": _small_convnet, "cnn-bn": _batchnorm_convnet, "cnn7": _seven_conv_net, "vgg": _vgg_gap_net}
