from pathlib import Path

import pytest

from tasks.datasets import (
    COLUMNS,
    NUM_PIXELS,
    DatasetConfigError,
    load_catalog,
    load_datasets_file,
    select_datasets,
)


def test_builtin_catalog_holds_both_datasets_with_published_facts(catalog):
    assert set(catalog) == {"mnist", "fashion-mnist"}
    mnist, fashion = catalog["mnist"], catalog["fashion-mnist"]
    assert (mnist.train.rows, mnist.test.rows) == (60000, 10000)
    assert mnist.header is False and fashion.header is True
    assert fashion.class_names[6] == "Shirt" and fashion.num_classes == 10
    assert sum(mnist.reference.class_counts) == 60000
    assert mnist.gates.min_accuracy == 0.97 and fashion.gates.min_accuracy == 0.85
    assert len(COLUMNS) == NUM_PIXELS + 1 == 785


def test_user_file_adds_a_dataset_and_can_override_a_builtin(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("""
[[dataset]]
name = "kmnist"
class_names = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
train = { path = "https://example.invalid/kmnist-train.csv" }
test = { path = "kmnist/test.csv.gz" }
gates = { min_accuracy = 0.9 }

[[dataset]]
name = "mnist"
header = false
class_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
train = { path = "mnist/mnist_train.csv.gz" }
test = { path = "mnist/mnist_test.csv.gz" }
gates = { min_accuracy = 0.5 }
""")
    catalog = load_catalog(path)
    assert catalog["kmnist"].header is None and catalog["kmnist"].reference is None
    assert catalog["kmnist"].train.sha256 is None
    assert catalog["mnist"].gates.min_accuracy == 0.5


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        ("not toml [", "cannot read datasets file"),
        ("x = 1", "expected one or more [[dataset]] tables"),
        ('[[dataset]]\nname = "Bad Name"\nclass_names=["a","b"]\ntrain={path="a"}\ntest={path="b"}\n'
         "gates={min_accuracy=0.5}", "dataset Bad Name"),
        ('[[dataset]]\nname = "d"\nclass_names=["a","b"]\ntrain={path="a", sha256="xyz"}\ntest={path="b"}\n'
         "gates={min_accuracy=0.5}", "sha256"),
        ('[[dataset]]\nname = "d"\nclass_names=["a","b"]\ntrain={path="a"}\ntest={path="b"}\n'
         "gates={min_accuracy=1.5}", "min_accuracy"),
        ('[[dataset]]\nname = "d"\nclass_names=["a","b"]\ntrain={path="a"}\ntest={path="b"}\n'
         "gates={min_accuracy=0.5}\nreference={class_counts=[1,2,3], pixel_mean=30, pixel_std=70}",
         "reference.class_counts has 3 entries but there are 2 class_names"),
    ],
)
def test_malformed_dataset_files_are_rejected_naming_the_problem(tmp_path, body, phrase):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(DatasetConfigError, match=None) as info:
        load_datasets_file(path)
    assert phrase in str(info.value)


def test_select_datasets_resolves_all_and_rejects_unknown_names(catalog):
    assert [s.name for s in select_datasets(catalog, ["all"])] == ["mnist", "fashion-mnist"]
    assert [s.name for s in select_datasets(catalog, ["fashion-mnist"])] == ["fashion-mnist"]
    with pytest.raises(DatasetConfigError, match=r"unknown dataset\(s\) \['emnist'\]"):
        select_datasets(catalog, ["mnist", "emnist"])


def test_missing_datasets_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetConfigError, match="cannot read datasets file"):
        load_catalog(Path(tmp_path / "nope.toml"))
