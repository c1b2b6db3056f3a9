"""A damaged registry fails loudly, the first publish of a dataset fsyncs its folder, the McNemar rule is
what the docs say, and parameters are checked before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prefect.utilities.callables import parameter_schema
from scipy.stats import binomtest

from flows import cli
from flows import train as train_flow
from tasks import storage
from tasks.artifacts import PROFILE_FILE
from tasks.publishing.promote import PromotionPolicy, decide_promotion
from tasks.registry import ChampionUnreadable, FolderRegistry
from tasks.registry.folder import POINTER, list_versions, read_production
from tests.support.publish_worker import (
    LINEAGE,
    PASSED,
    publish_candidate,
    publish_model,
)

DATASET = "unit"


def damage(registry, how: str) -> None:
    pointer = registry / DATASET / POINTER
    pointer.unlink()
    if how == "empty":
        pointer.write_text("")
    elif how == "missing version":
        pointer.write_text("20990101T000000Z-gone00\n")
    elif how == "directory":
        pointer.mkdir()
    elif how == "escape":
        pointer.write_text("../../etc\n")


@pytest.mark.parametrize("how", ["empty", "missing version", "directory", "escape"])
def test_a_damaged_production_pointer_fails_as_an_unreadable_champion_naming_the_file(tmp_path, candidate, how):
    """Before: these read as "no champion", and the next challenger was published on its gates alone."""
    registry = tmp_path / "registry"
    first = publish_candidate(registry, DATASET, candidate)
    damage(registry, how)
    pointer = registry / DATASET / POINTER
    with pytest.raises(ChampionUnreadable, match=str(pointer)):
        read_production(registry, DATASET)
    with pytest.raises(ChampionUnreadable, match=str(pointer)):
        publish_candidate(registry, DATASET, candidate)
    assert list_versions(registry, DATASET) == [first.version]


def test_no_pointer_at_all_is_no_champion(tmp_path):
    assert read_production(tmp_path, DATASET) is None
    assert FolderRegistry(tmp_path).champion_profile(DATASET) is None


def test_the_first_publish_of_a_dataset_fsyncs_its_new_folder_into_the_registry(tmp_path, candidate, monkeypatch):
    synced = []
    real = storage.fsync_dir
    monkeypatch.setattr(storage, "fsync_dir", lambda path: (synced.append(path), real(path))[1])
    registry = tmp_path / "registry"
    publish_candidate(registry, DATASET, candidate)
    assert registry in synced, f"the registry folder was not fsynced after creating {registry / DATASET}: {synced}"
    synced.clear()
    publish_candidate(registry, DATASET, candidate)
    assert registry not in synced  # only the first publish creates the folder


def test_a_published_version_stores_the_data_profile_of_its_run(tmp_path, candidate):
    profile = {"dataset": DATASET, "splits": {}}
    run_profile = tmp_path / "run" / PROFILE_FILE
    run_profile.parent.mkdir()
    run_profile.write_text(json.dumps(profile))
    published = publish_model(tmp_path / "registry", DATASET, "v1", candidate.model_path, candidate.metrics, PASSED,
                              LINEAGE, test_parquet=candidate.test_parquet, predictions_path=candidate.predictions_path,
                              files={PROFILE_FILE: run_profile})
    stored = published.path / PROFILE_FILE
    assert json.loads(stored.read_text()) == profile
    assert FolderRegistry(tmp_path / "registry").champion_profile(DATASET) == stored


def test_mcnemar_is_two_sided_at_alpha_refusing_only_a_worse_challenger():
    """The rule as README and promote.py state it: refuse when c > b and the two-sided exact p < alpha
    (0.05), i.e. a one-sided test at level alpha / 2 = 0.025."""
    labels = np.zeros(1000, dtype=int)

    def case(b: int, c: int):
        challenger, champion = labels.copy(), labels.copy()
        challenger[:c] = 1  # champion-only right
        champion[c:c + b] = 1  # challenger-only right
        return decide_promotion(labels, challenger, champion, "v0", PromotionPolicy(tolerance=1.0, alpha=0.05))

    b, c = 10, 21
    one_sided = binomtest(b, b + c, 0.5, alternative="less").pvalue
    assert 0.025 < one_sided < 0.05  # significant one-sided at 0.05, but not two-sided
    assert case(b, c).promoted and case(b, c).p_value == pytest.approx(2 * one_sided)
    refused = case(8, 24)
    assert not refused.promoted and refused.refused_by == ["mcnemar"] and refused.p_value < 0.05
    assert case(24, 8).promoted  # significantly better is never refused


@pytest.mark.parametrize(("params", "field"), [({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"),
                                               ({"source": "ftp://host/x"}, "source"),
                                               ({"dataset": "../etc"}, "dataset"), ({"epochs": 0}, "epochs")])
def test_the_flow_signature_refuses_out_of_domain_parameters(params, field):
    with pytest.raises(Exception, match=field):
        train_flow.train_mnist.validate_parameters(params)
    schema = parameter_schema(train_flow.train_mnist).model_dump()["properties"]["seed"]
    assert schema["minimum"] == 0 and schema["maximum"] == 2**32 - 1


def test_the_cli_refuses_a_bad_seed_before_any_work(tmp_path, capsys):
    """Before: a seed numpy refuses failed the run only after download, validation and conversion."""
    code = cli.main(["--seed", str(2**32), "--data-dir", str(tmp_path / "data")])
    assert code == 2 and "seed" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
