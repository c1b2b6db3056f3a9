"""The model architectures train-mnist trains, and the test-time views a saved model may average over.

Every model takes raw rows, shape (N, 784), pixels 0..255, and returns class probabilities; it scales
and (in training only) augments the pixels itself, so the saved ``model.keras`` needs nothing else.
"""

from __future__ import annotations

from tasks.datasets import IMAGE_SHAPE, NUM_PIXELS, TrainConfig
from tasks.model_io import import_keras


def build_model(config: TrainConfig, num_classes: int, steps_per_epoch: int = 1):
    """A compiled Keras model over raw 0..255 pixel rows (augmentation layers act in training only).

    - ``mlp``: the seeds' baseline, Dense 512-512 with dropout.
    - ``cnn``: small convnet (conv32-pool-conv64-pool-dense128, ~225K parameters).
    - ``cnn-bn``: conv32x2-pool-conv64x2-pool-dense128 with batch normalisation (~470K parameters).
    """
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
            x = layers.RandomRotation(config.rotate, fill_mode="constant", seed=config.seed)(x)
        if config.zoom:
            x = layers.RandomZoom(config.zoom, fill_mode="constant", seed=config.seed)(x)
        if config.translate:
            x = layers.RandomTranslation(config.translate, config.translate, fill_mode="constant", seed=config.seed)(x)
        if config.erase:
            x = layers.RandomErasing((config.erase, config.erase), fill_value=0.0, value_range=(0, 1), seed=config.seed)(x)
        x = _small_convnet(layers, x) if config.model == "cnn" else _batchnorm_convnet(layers, x)
        x = layers.Dense(128, activation="relu")(x)
        x = layers.Dropout(0.3 if config.model == "cnn-bn" else 0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"train_mnist_{config.model.replace('-', '_')}")
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, config.epochs * steps_per_epoch)
    # Label smoothing needs one-hot targets (training_targets gives them); without it the labels stay as they are.
    loss = (keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing) if config.label_smoothing
            else keras.losses.SparseCategoricalCrossentropy())
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=["accuracy"])
    return model


SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows down, columns right), one pixel each way


def with_test_time_views(model, views: str):
    """``model`` wrapped so that it averages its probabilities over views of each image, built from standard layers.

    ``flip``: the image and its mirror; ``shifts``: the image and its four 1-pixel shifts. Inputs and outputs
    are unchanged (raw rows in, probabilities out), so whoever loads ``model.keras`` gets the views too.
    """
    if views == "none":
        return model
    keras = import_keras()
    layers = keras.layers
    inputs = keras.Input(shape=(NUM_PIXELS,), name="pixels")
    image = layers.Reshape((*IMAGE_SHAPE, 1), name="image")(inputs)
    if views == "flip":
        others = [keras.ops.flip(image, axis=2)]
    else:
        others = [_shifted(layers, image, down, right) for down, right in SHIFTS]
    flat = [inputs] + [layers.Reshape((NUM_PIXELS,))(view) for view in others]
    outputs = layers.Average(name="probabilities")([model(view) for view in flat])
    return keras.Model(inputs, outputs, name=f"{model.name}_{views}_views")


def _shifted(layers, image, down: int, right: int):
    """The image moved by (down, right) pixels, zeros coming in, same size."""
    pad = ((max(down, 0), max(-down, 0)), (max(right, 0), max(-right, 0)))
    crop = ((max(-down, 0), max(down, 0)), (max(-right, 0), max(right, 0)))
    return layers.Cropping2D(crop)(layers.ZeroPadding2D(pad)(image))


def _small_convnet(layers, x):
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    return layers.Flatten()(x)


def _batchnorm_convnet(layers, x):
    for filters in (32, 64):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    return layers.Dropout(0.3)(x)
