"""How a model is trained: the typed recipe options, each dataset's default recipe, and a run's TrainConfig.

A dataset's recipe lives in ``tasks/datasets.toml`` beside its files and gates; this module says what a
recipe may hold, checks it, and applies a run's overrides (another model, epochs, seed, rows).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ModelKind = Literal["mlp", "cnn", "cnn-bn", "cnn7", "vgg"]
OptimizerKind = Literal["adam", "sgd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TestTimeViews = Literal["none", "flip", "shifts", "flip-shifts"]
Interpolation = Literal["bilinear", "nearest"]


class RecipeOptions(_Strict):
    """How a model is trained (besides its kind and epochs): a dataset's recipe and a run's TrainConfig share these."""

    # Mirroring keeps a garment's class but not a digit's, so it is opt-in per dataset.
    horizontal_flip: bool = False
    translate: float = Field(default=0.1, ge=0, lt=0.5, description="Random shifts (CNNs), share of the side")
    rotate: float = Field(default=0.0, ge=0, lt=0.5, description="Random rotations (CNNs), share of a full turn")
    zoom: float = Field(default=0.0, ge=0, lt=0.5, description="Random zoom in/out (CNNs), share of the side")
    erase: float = Field(default=0.0, ge=0, le=1,
                         description="Random erasing (CNNs): share of training images with a random patch blanked")
    interpolation: Interpolation = Field(
        default="bilinear", description="How shifted, rotated and zoomed training images are resampled: bilinear "
        "blurs them between pixels, nearest keeps them as sharp as the test images")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Share of each target spread over all classes")
    batch_size: int = Field(default=128, gt=0)
    test_time_views: TestTimeViews = Field(
        default="none", description="Views the saved model averages: the image and its mirror (flip), its four "
        "1-pixel shifts (shifts), or both and the mirror's shifts (flip-shifts)")
    validation_fraction: float = Field(
        default=0.1, ge=0, lt=0.5,
        description="Train rows held out for early stopping; 0: fit on every row for exactly the given epochs")
    mixed_bfloat16: bool = Field(
        default=False, description="Convnet layers compute in bfloat16 (weights stay float32) on CPUs that do it "
        "natively (AVX512_BF16 or AMX); float32 elsewhere. The saved model computes in float32 everywhere")


class OptimizerOptions(_Strict):
    """How the weights are updated: a recipe's choice for its architecture (a run's other model gets the defaults)."""

    optimizer: OptimizerKind = Field(default="adam", description="adam, or sgd (Nesterov momentum 0.9)")
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak rate; cosine decay to 0 over the epochs")
    warmup_epochs: float = Field(default=0.0, ge=0, description="Linear warm-up from 0 to the peak rate")
    weight_decay: float = Field(default=0.0, ge=0, lt=1, description="Decoupled weight decay (per unit learning rate)")
    ema: float = Field(default=0.0, ge=0, lt=1, description="The saved weights are their moving average with this "
                       "decay per step (0: the last weights)")


# Options that act through the convnets' augmentation layers: an mlp has none.
AUGMENTATION_FIELDS = ("horizontal_flip", "translate", "rotate", "zoom", "erase")


class Recipe(RecipeOptions, OptimizerOptions):
    """The dataset's default training recipe: what the nightly run trains when no model is given."""

    model: ModelKind = "mlp"
    epochs: int = Field(default=12, gt=0)


DEFAULT_SEED = 42
# Epochs when a model other than the dataset's recipe is asked for without --epochs.
DEFAULT_EPOCHS: dict[str, int] = {"mlp": 12, "cnn": 15, "cnn-bn": 16, "cnn7": 15, "vgg": 15}


class TrainConfig(RecipeOptions, OptimizerOptions):
    """Everything that decides the trained weights (with the data)."""

    model: ModelKind = "mlp"
    epochs: int = Field(default=DEFAULT_EPOCHS["mlp"], gt=0)
    seed: int = DEFAULT_SEED
    patience: int = Field(default=4, ge=1, description="Early stopping on validation loss")
    train_rows: int | None = Field(default=None, gt=0, description="Use only the first N train rows")


def train_config_for(recipe: Recipe, model: ModelKind | None = None, epochs: int | None = None, seed: int = DEFAULT_SEED,
                     train_rows: int | None = None) -> TrainConfig:
    """The dataset's recipe, with the run's overrides applied."""
    chosen = model or recipe.model
    own = chosen == recipe.model
    default_epochs = recipe.epochs if own else DEFAULT_EPOCHS[chosen]
    # Augmentation suits the data, whatever the model; the optimizer and the test-time views were chosen for
    # the recipe's architecture only.
    kept = recipe.model_dump(exclude={"model", "epochs"} | (set() if own else {*OptimizerOptions.model_fields,
                                                                                  "test_time_views"}))
    return TrainConfig(model=chosen, epochs=epochs or default_epochs, seed=seed, train_rows=train_rows, **kept)


def applied_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Training parameters as they act: the mlp has no augmentation layers, so its shift/flip/rotation/zoom/erasing go."""
    if parameters.get("model") != "mlp":
        return dict(parameters)
    return {k: v for k, v in parameters.items() if k not in AUGMENTATION_FIELDS}
