import json

import numpy as np
import pytest

from tasks.conversion.convert import convert_to_parquet
from tasks.conversion.parquet import load_xy
from tasks.datasets import NUM_PIXELS, Gates
from tasks.evaluation.evaluate import compute_metrics, evaluate_model
from tasks.model_io import load_model
from tasks.publishing.gate import check_gates
from tasks.training.recipes import DEFAULT_EPOCHS, TrainConfig, train_config_for
from tasks.training.train import train_model


@pytest.fixture(scope="module")
def mnist_parquet(catalog, slice_mirror, tmp_path_factory):
    spec = catalog["mnist"]
    out = tmp_path_factory.mktemp("pq")
    return {split: convert_to_parquet(slice_mirror / spec.split(split).path, out / f"{split}.parquet", False)
            for split in ("train", "test")}


@pytest.fixture(scope="module")
def trained(mnist_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(model="mlp", epochs=3, train_rows=2000, patience=3)
    return train_model(mnist_parquet["train"], 10, config, out), out


def test_training_lowers_the_loss_and_writes_its_outputs(trained):
    model_path, out = trained
    history = json.loads((out / "training_curves.json").read_text())
    assert len(history["loss"]) == 3
    assert history["loss"][-1] < history["loss"][0]
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard logs"
    assert model_path.name == "model.keras" and not list(out.glob(".model.*.keras"))


def test_saved_model_scores_raw_csv_rows_without_knowing_the_training(trained, catalog, slice_mirror):
    model_path, _ = trained
    import gzip

    with gzip.open(slice_mirror / catalog["mnist"].test.path, "rt") as fh:
        rows = [[int(v) for v in fh.readline().split(",")] for _ in range(64)]
    raw = np.array(rows, dtype=np.float32)
    model = load_model(model_path)
    probabilities = np.asarray(model.predict(raw[:, 1:], verbose=0))
    assert probabilities.shape == (64, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (probabilities.argmax(axis=1) == raw[:, 0]).mean() > 0.8  # raw 0..255 pixels in, sensible answers out


def test_same_seed_and_data_give_the_same_metrics(mnist_parquet, tmp_path):
    config = TrainConfig(model="mlp", epochs=1, train_rows=1000, seed=7)
    metrics = []
    for run in ("a", "b"):
        model = train_model(mnist_parquet["train"], 10, config, tmp_path / run)
        metrics.append(evaluate_model(model, mnist_parquet["test"], [str(i) for i in range(10)],
                                                   tmp_path / run).metrics)
    assert metrics[0].test_accuracy == metrics[1].test_accuracy
    assert metrics[0].test_loss == metrics[1].test_loss
    assert metrics[0].confusion_matrix == metrics[1].confusion_matrix


@pytest.mark.parametrize("kind", ["cnn", "cnn-bn"])
def test_convnets_take_raw_rows_and_reload_in_safe_mode(kind, mnist_parquet, tmp_path):
    config = TrainConfig(model=kind, epochs=1, train_rows=256, horizontal_flip=True, rotate=0.03, zoom=0.1)
    model = load_model(train_model(mnist_parquet["train"], 10, config, tmp_path))
    assert model.input_shape == (None, NUM_PIXELS) and model.output_shape == (None, 10)
    layer_types = {type(layer).__name__ for layer in model.layers}
    assert {"RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "Rescaling"} <= layer_types
    # Augmentation is for training only: the saved model scores a row the same way every time.
    rows = load_xy(mnist_parquet["test"], 8)[0]
    np.testing.assert_array_equal(model.predict(rows, verbose=0), model.predict(rows, verbose=0))


def test_train_config_follows_the_dataset_recipe_unless_overridden(catalog):
    fashion = catalog["fashion-mnist"].recipe
    config = train_config_for(fashion)
    assert (config.model, config.epochs, config.horizontal_flip) == (fashion.model, fashion.epochs, True)
    assert train_config_for(fashion, model="mlp").epochs == DEFAULT_EPOCHS["mlp"]
    assert train_config_for(fashion, model="mlp", epochs=3, train_rows=10).model_dump()["train_rows"] == 10
    assert train_config_for(catalog["mnist"].recipe).horizontal_flip is False  # a mirrored 2 is not a 2


def test_evaluate_writes_metrics_json_with_the_contract(trained, mnist_parquet, tmp_path):
    model_path, _ = trained
    evaluation = evaluate_model(model_path, mnist_parquet["test"], [str(i) for i in range(10)], tmp_path)
    doc = json.loads(evaluation.metrics_path.read_text())
    # What the run hands on is what it wrote for people: the same numbers, no second definition.
    assert evaluation.metrics.model_dump() == doc
    assert np.array_equal(evaluation.predictions, np.load(evaluation.predictions_path))
    assert np.array_equal(evaluation.probabilities, np.load(evaluation.probabilities_path))
    assert np.array_equal(evaluation.predictions, evaluation.probabilities.argmax(axis=1))
    _, labels = load_xy(mnist_parquet["test"])
    assert isinstance(doc["test_accuracy"], float) and 0.8 < doc["test_accuracy"] <= 1.0
    cm = np.array(doc["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == len(labels)
    assert np.array_equal(cm.sum(axis=1), np.bincount(labels, minlength=10))  # rows are true classes
    assert abs(np.trace(cm) / cm.sum() - doc["test_accuracy"]) < 1e-12


def test_compute_metrics_on_known_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.eye(3)[predicted] * 0.98 + 0.01
    m = compute_metrics(labels, probabilities, ["a", "b", "c"])
    assert m.test_accuracy == pytest.approx(4 / 6)
    assert m.confusion_matrix == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m.recall == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert m.precision["b"] == pytest.approx(2 / 3)
    assert {(p.true, p.predicted, p.count) for p in m.most_confused} == {("a", "b", 1), ("c", "a", 1)}


def _metrics(accuracy, recalls):
    names = [str(i) for i in range(len(recalls))]
    m = compute_metrics(np.array([0, 1]), np.eye(2)[[0, 1]], ["0", "1"])
    return m.model_copy(update={"test_accuracy": accuracy, "class_names": names,
                                "recall": dict(zip(names, recalls, strict=True))})


def test_gate_passes_when_accuracy_and_every_recall_clear_their_floors():
    decision = check_gates(_metrics(0.98, [0.97, 0.95]), Gates(min_accuracy=0.97, min_class_recall=0.9))
    assert decision.passed
    assert any("PASS min_accuracy" in r for r in decision.reasons)


def test_gate_fails_naming_the_gate_threshold_and_measured_value():
    decision = check_gates(_metrics(0.96, [0.99, 0.42]), Gates(min_accuracy=0.97, min_class_recall=0.5))
    assert not decision.passed
    assert "FAIL min_accuracy: test_accuracy 0.9600 < threshold 0.9700" in decision.reasons
    assert "FAIL min_class_recall: class '1' recall 0.4200 < threshold 0.5000" in decision.reasons


def _image_rows(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 28, 28)


def _inner_net(model):
    (net,) = [layer for layer in model.layers if hasattr(layer, "layers")]
    return net


def test_flip_views_make_the_saved_model_mirror_invariant(mnist_parquet, tmp_path):
    config = TrainConfig(model="cnn-bn", epochs=1, train_rows=256, test_time_views="flip")
    model = load_model(train_model(mnist_parquet["train"], 10, config, tmp_path))
    rows = load_xy(mnist_parquet["test"], 16)[0].astype(np.float32)
    mirrored = _image_rows(rows)[:, :, ::-1].reshape(-1, NUM_PIXELS)
    scores, scores_of_mirror = model.predict(rows, verbose=0), model.predict(mirrored, verbose=0)
    np.testing.assert_allclose(scores, scores_of_mirror, atol=1e-6)
    net = _inner_net(model)  # the trained network itself: its own answers on both views, averaged
    expected = (net.predict(rows, verbose=0) + net.predict(mirrored, verbose=0)) / 2
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert not np.allclose(net.predict(rows, verbose=0), expected, atol=1e-4), "one view alone gives the same"


def test_shift_views_average_the_image_and_its_four_one_pixel_shifts(mnist_parquet, tmp_path):
    config = TrainConfig(model="cnn", epochs=1, train_rows=256, test_time_views="shifts")
    model = load_model(train_model(mnist_parquet["train"], 10, config, tmp_path))
    images = np.zeros((4, 30, 30), np.float32)  # 28x28 images inside a blank border: shifting loses nothing
    images[:, 1:29, 1:29] = _image_rows(load_xy(mnist_parquet["test"], 4)[0])
    views = [images[:, 1 - down:29 - down, 1 - right:29 - right].reshape(-1, NUM_PIXELS)
             for down, right in ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))]
    net = _inner_net(model)
    expected = np.mean([net.predict(view, verbose=0) for view in views], axis=0)
    np.testing.assert_allclose(model.predict(views[0], verbose=0), expected, atol=1e-6)


def test_without_a_hold_out_every_row_trains_for_exactly_the_epochs(mnist_parquet, tmp_path):
    config = TrainConfig(model="mlp", epochs=2, train_rows=640, validation_fraction=0, batch_size=64)
    train_model(mnist_parquet["train"], 10, config, tmp_path)
    history = json.loads((tmp_path / "training_curves.json").read_text())
    assert sorted(history) == ["accuracy", "loss"]  # nothing held out, nothing to validate on
    assert len(history["loss"]) == 2
    events = list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert events and not (tmp_path / "tensorboard" / "validation").exists()


def test_label_smoothing_and_erasing_train_from_plain_labels_and_save_a_fixed_scorer(mnist_parquet, tmp_path):
    config = TrainConfig(model="cnn-bn", epochs=1, train_rows=256, label_smoothing=0.1, erase=0.5)
    model = load_model(train_model(mnist_parquet["train"], 10, config, tmp_path))
    assert "RandomErasing" in {type(layer).__name__ for layer in model.layers}
    rows = load_xy(mnist_parquet["test"], 8)[0]
    np.testing.assert_array_equal(model.predict(rows, verbose=0), model.predict(rows, verbose=0))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_spreads_that_share_of_each_target_over_the_classes(smoothing):
    from tasks.training.architectures import build_model
    from tasks.training.fitting import training_targets

    config = TrainConfig(model="mlp", label_smoothing=smoothing)
    model = build_model(config, 10)
    labels = np.array([3, 7])
    smoothed = np.full((2, 10), smoothing / 10, np.float32)
    smoothed[[0, 1], labels] += 1 - smoothing
    # Predicting exactly the smoothed target costs its entropy, the least cross-entropy can be (unsmoothed: 0.094).
    entropy = -(smoothed[0] * np.log(smoothed[0], where=smoothed[0] > 0, out=np.zeros(10))).sum()
    assert float(model.loss(training_targets(config, labels, 10), smoothed)) == pytest.approx(entropy, abs=1e-4)


@pytest.mark.parametrize("field, value, words", [
    ("test_time_views", "rotations", "test_time_views"),
    ("validation_fraction", 0.6, "validation_fraction"),
    ("erase", 1.5, "erase"),
    ("label_smoothing", -0.1, "label_smoothing"),
])
def test_recipe_rejects_bad_training_options_naming_them(field, value, words):
    from pydantic import ValidationError

    from tasks.training.recipes import Recipe

    with pytest.raises(ValidationError, match=words):
        Recipe(model="cnn-bn", **{field: value})
