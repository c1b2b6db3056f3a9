"""Promotion against the champion: McNemar's exact test and the tolerance, pure and with real Keras models."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.conversion.parquet import load_xy
from tasks.publishing.promote import (
    PromotionPolicy,
    decide_promotion,
    discordant_counts,
    first_version_decision,
    mcnemar_exact_p,
    refusal_message,
)
from tasks.publishing.publish import GateFailed, PromotionRefused
from tasks.registry import ChampionUnreadable
from tasks.registry.folder import dataset_lock, list_versions, read_production, set_production
from tasks.registry.run_log import RUN_LOG_FILE, TREND_FILE
from tasks.results import read_metrics
from tests.support.publish_worker import Candidate, make_candidate, publish_candidate

DATASET = "mnist"
POLICY = PromotionPolicy()


def paired(n: int, b: int, c: int, both_wrong: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels, challenger, champion with exactly b challenger-only and c champion-only right rows."""
    labels = np.arange(n) % 10
    challenger, champion = labels.copy(), labels.copy()
    champion[:b] = (labels[:b] + 1) % 10
    challenger[b:b + c] = (labels[b:b + c] + 1) % 10
    wrong = slice(b + c, b + c + both_wrong)  # both wrong, differently: concordant, not counted
    challenger[wrong], champion[wrong] = (labels[wrong] + 2) % 10, (labels[wrong] + 3) % 10
    return labels, challenger, champion


# ---- pure functions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "c", "expected"), [
    (0, 6, 2 / 2**6),  # 2 * P(X <= 0), X ~ Bin(6, 1/2)
    (6, 0, 2 / 2**6),
    (1, 9, 2 * (1 + 10) / 2**10),  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    (3, 4, 1.0),
    (5, 5, 1.0),
    (0, 0, 1.0),  # no discordant rows: no evidence either way
])
def test_mcnemar_exact_p_is_the_two_sided_binomial_on_discordant_counts(b, c, expected):
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="b=-1, c=2"):
        mcnemar_exact_p(-1, 2)


def test_discordant_counts_ignore_rows_both_get_wrong():
    labels, challenger, champion = paired(100, b=7, c=3, both_wrong=20)
    assert discordant_counts(labels, challenger, champion) == (7, 3)


def test_equal_predictions_are_promoted():
    labels, challenger, champion = paired(600, b=0, c=0, both_wrong=60)
    decision = decide_promotion(labels, challenger, champion, "v1", POLICY)
    assert decision.promoted and decision.refused_by == []
    assert decision.challenger_accuracy == decision.champion_accuracy == 0.9
    assert (decision.challenger_only_right, decision.champion_only_right, decision.p_value) == (0, 0, 1.0)


def test_significantly_better_challenger_is_promoted():
    decision = decide_promotion(*paired(10_000, b=45, c=10), "v1", POLICY)
    assert decision.promoted and decision.p_value < 1e-4
    assert all(r.startswith("PASS") for r in decision.reasons)


def test_drop_of_exactly_the_tolerance_is_accepted():
    decision = decide_promotion(*paired(1000, b=0, c=5), "v1", POLICY)  # 0.005 lower, p = 0.0625
    assert decision.promoted, decision.reasons


def test_drop_beyond_the_tolerance_is_refused_even_when_not_significant():
    decision = decide_promotion(*paired(1000, b=2, c=8), "v1", POLICY)  # 0.006 lower, p = 0.109
    assert not decision.promoted and decision.refused_by == ["tolerance"]
    assert decision.p_value == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert "FAIL tolerance: accuracy 0.9920 is 0.0060 below champion v1's 0.9980, more than tolerance 0.0050" \
        in decision.reasons


def test_significantly_worse_within_the_tolerance_is_refused_by_mcnemar():
    decision = decide_promotion(*paired(10_000, b=10, c=45), "v1", POLICY)  # only 0.0035 lower
    assert not decision.promoted and decision.refused_by == ["mcnemar"]
    assert decision.p_value < 1e-5


def test_policy_is_configurable_and_validated():
    data = paired(1000, b=2, c=8)
    assert decide_promotion(*data, "v1", PromotionPolicy(tolerance=0.01)).promoted
    assert not decide_promotion(*paired(1000, b=0, c=5), "v1", PromotionPolicy(alpha=0.1)).promoted  # p=0.0625
    for bad in ({"tolerance": -0.01}, {"alpha": 0.0}, {"alpha": 1.0}, {"tolerence": 0.1}):
        with pytest.raises(ValidationError):
            PromotionPolicy(**bad)


def test_refusal_message_names_champion_accuracies_p_value_and_rules():
    decision = decide_promotion(*paired(1000, b=1, c=20), "20250101T000000Z-abcdef", POLICY)
    message = refusal_message("mnist", "20250202T000000Z-123456", decision)
    assert message.startswith("mnist: challenger 20250202T000000Z-123456 not promoted over champion "
                              "20250101T000000Z-abcdef: test accuracy 0.9800 vs champion 0.9990 on 1000 rows, "
                              f"McNemar exact p={decision.p_value:.4g} (b=1, c=20); refused by rule(s) "
                              "tolerance, mcnemar:")
    assert "FAIL tolerance" in message and "FAIL mcnemar" in message and "PASS" not in message


def test_first_version_is_decided_by_the_absolute_gates_alone():
    labels, challenger, _ = paired(100, b=0, c=30)
    decision = first_version_decision(labels, challenger, POLICY)
    assert decision.promoted and decision.champion_version is None and decision.challenger_accuracy == 0.7
    assert decision.p_value is None and "no champion" in decision.reasons[0]


def test_unpaired_predictions_are_an_error():
    labels, challenger, champion = paired(100, b=1, c=1)
    with pytest.raises(ValueError, match=r"champion predictions have shape \(99,\), expected \(100,\)"):
        decide_promotion(labels, challenger, champion[:99], "v1", POLICY)


# ---- real Keras models, published through tasks.publishing.publish ------------------------------------------------


@pytest.fixture(scope="module")
def models(trained_models) -> dict[str, Candidate]:
    return trained_models


@pytest.fixture(scope="module")
def strong_registry(models, tmp_path_factory) -> tuple[Path, str]:
    """A registry whose production model is ``strong``, published first (no champion)."""
    registry = tmp_path_factory.mktemp("strong-registry")
    published = publish_candidate(registry, DATASET, models["strong"], "20250101T000000Z-strong")
    return registry, published.version


@pytest.fixture
def registry(strong_registry, tmp_path) -> tuple[Path, str]:
    """A private copy of ``strong_registry``."""
    src, champion = strong_registry
    shutil.copytree(src, tmp_path / "registry")
    return tmp_path / "registry", champion


def _state(registry: Path) -> tuple:
    """Pointer, versions and every file's bytes; the dataset's history, which records every run, aside."""
    root = registry / DATASET
    history = {root / RUN_LOG_FILE, root / TREND_FILE}
    return read_production(registry, DATASET), list_versions(registry, DATASET), {
        p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p not in history}


def test_first_publish_has_no_champion_and_says_so(strong_registry, models):
    registry, version = strong_registry
    doc = json.loads((registry / DATASET / version / "metrics.json").read_text())
    assert doc["promotion"]["champion_version"] is None and doc["promotion"]["promoted"] is True
    assert doc["promotion"]["challenger_accuracy"] == read_metrics(models["strong"].metrics_path).test_accuracy
    card = (registry / DATASET / version / "model_card.md").read_text()
    assert "**PROMOTED**: no champion (first version of this dataset); the absolute gates alone decided." in card


def test_better_challenger_is_promoted_over_a_rescored_champion(models, tmp_path):
    registry = tmp_path / "registry"
    champion = publish_candidate(registry, DATASET, models["weak"], "20250101T000000Z-weak00").version
    published = publish_candidate(registry, DATASET, models["strong"], "20250102T000000Z-strong")
    assert read_production(registry, DATASET) == published.version
    promotion = published.promotion
    assert promotion.promoted and promotion.champion_version == champion and promotion.test_rows == 600
    # The champion was re-scored on the challenger's test Parquet: the same number its own evaluation gave.
    assert promotion.champion_accuracy == read_metrics(models["weak"].metrics_path).test_accuracy
    assert promotion.challenger_accuracy == read_metrics(models["strong"].metrics_path).test_accuracy
    b, c = promotion.challenger_only_right, promotion.champion_only_right
    assert b - c == round((promotion.challenger_accuracy - promotion.champion_accuracy) * 600) and b > c
    assert promotion.p_value == pytest.approx(mcnemar_exact_p(b, c))
    assert json.loads((published.path / "metrics.json").read_text())["promotion"] == promotion.model_dump()
    card = (published.path / "model_card.md").read_text()
    assert f"**PROMOTED** against champion `{champion}`, both scored on the same 600 test rows." in card
    for line in (f"| challenger test accuracy | {promotion.challenger_accuracy:.4f} |",
                 f"| champion test accuracy | {promotion.champion_accuracy:.4f} |",
                 f"| challenger right, champion wrong (b) | {b} |",
                 f"| champion right, challenger wrong (c) | {c} |",
                 f"| McNemar exact p-value (two-sided) | {promotion.p_value:.4g} |"):
        assert line in card


def test_equal_challenger_is_promoted(registry, models):
    registry, champion = registry
    published = publish_candidate(registry, DATASET, models["strong"], "20250102T000000Z-same00")
    assert published.promotion.promoted and published.promotion.champion_version == champion
    assert (published.promotion.challenger_only_right, published.promotion.champion_only_right) == (0, 0)
    assert published.promotion.p_value == 1.0 and read_production(registry, DATASET) == published.version


def test_worse_challenger_is_refused_and_nothing_changes(registry, models):
    registry, champion = registry
    before = _state(registry)
    with pytest.raises(PromotionRefused) as refused:
        publish_candidate(registry, DATASET, models["weak"], "20250102T000000Z-weak00")
    weak = read_metrics(models["weak"].metrics_path).test_accuracy
    strong = read_metrics(models["strong"].metrics_path).test_accuracy
    message = str(refused.value)
    assert message.startswith(f"mnist: challenger 20250102T000000Z-weak00 not promoted over champion {champion}: "
                              f"test accuracy {weak:.4f} vs champion {strong:.4f} on 600 rows, McNemar exact p=")
    assert "refused by rule(s) tolerance, mcnemar:" in message
    assert isinstance(refused.value, GateFailed)  # callers that stop on a failed gate stop on this too
    assert _state(registry) == before


def test_significantly_worse_challenger_is_refused_by_mcnemar(registry, models):
    registry, champion = registry
    before = _state(registry)
    with pytest.raises(PromotionRefused, match=r"refused by rule\(s\) mcnemar:\n- FAIL mcnemar: significantly "
                                               rf"worse than champion {champion} by McNemar's exact test"):
        publish_candidate(registry, DATASET, models["untrained"], policy=PromotionPolicy(tolerance=1.0))
    assert _state(registry) == before


def test_challenger_below_the_tolerance_is_refused_even_if_not_significant(registry, models, tmp_path):
    registry, champion = registry
    strong = models["strong"]
    labels = load_xy(strong.test_parquet)[1]
    predictions = np.load(strong.predictions_path).astype(np.int64)
    flip = np.flatnonzero(predictions == labels)[:4]  # 4 of 600 rows: 0.0067 lower, b=0, c=4, p=0.125
    predictions[flip] = (labels[flip] + 1) % 10
    challenger = make_candidate(tmp_path / "slightly-worse", labels, predictions,
                                model_bytes=strong.model_path.read_bytes(), test_parquet=strong.test_parquet)
    before = _state(registry)
    with pytest.raises(PromotionRefused, match=r"McNemar exact p=0\.125 \(b=0, c=4\); refused by rule\(s\) "
                                               r"tolerance:\n- FAIL tolerance: .* is 0\.0067 below champion"):
        publish_candidate(registry, DATASET, challenger)
    assert _state(registry) == before


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_unreadable_champion_fails_naming_the_file_and_loses_nothing(registry, models, damage):
    registry, champion = registry
    champion_file = registry / DATASET / champion / "model.keras"
    if damage == "corrupt":
        champion_file.write_bytes(b"PK\x03\x04 this is not a keras archive")
    else:
        champion_file.unlink()
    before = _state(registry)
    expected = "cannot be loaded or scored" if damage == "corrupt" else "is missing"
    with pytest.raises(ChampionUnreadable, match=rf"mnist: champion {champion}'s model file .*{expected}") as exc:
        publish_candidate(registry, DATASET, models["strong"])
    assert str(champion_file) in str(exc.value) and str(registry / DATASET / "production") in str(exc.value)
    assert _state(registry) == before


def _waiting_for_lock(lock_file: Path) -> bool:
    """True if a process or thread is blocked waiting for a flock on ``lock_file`` (Linux /proc/locks)."""
    inode = f":{lock_file.stat().st_ino}"
    return any("->" in line and any(field.endswith(inode) for field in line.split())
               for line in Path("/proc/locks").read_text().splitlines())


def test_champion_is_read_under_the_lock_so_a_stale_one_is_never_beaten(models, tmp_path):
    """A run waiting for the lock is compared with what the run before it published, not a stale pointer."""
    registry = tmp_path / "registry"
    untrained = publish_candidate(registry, DATASET, models["untrained"], "20250101T000000Z-untrn0").version
    strong = publish_candidate(registry, DATASET, models["strong"], "20250102T000000Z-strong").version
    set_production(registry, DATASET, untrained)  # rolled back: a poor champion is in production
    outcome: dict[str, object] = {}

    def challenger_run() -> None:  # better than the untrained model, worse than the strong one
        try:
            outcome["result"] = publish_candidate(registry, DATASET, models["weak"], "20250103T000000Z-weak00")
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread
            outcome["result"] = exc

    with dataset_lock(registry, DATASET):  # another run is publishing...
        thread = threading.Thread(target=challenger_run)
        thread.start()
        deadline = time.monotonic() + 60
        while not _waiting_for_lock(registry / DATASET / ".lock"):
            assert thread.is_alive() and time.monotonic() < deadline, f"the challenger never waited: {outcome}"
            time.sleep(0.01)
        set_production(registry, DATASET, strong)  # ...and puts the strong model in production
    thread.join(120)
    assert isinstance(outcome["result"], PromotionRefused), outcome
    assert f"not promoted over champion {strong}" in str(outcome["result"])
    assert read_production(registry, DATASET) == strong
    assert list_versions(registry, DATASET) == [untrained, strong]
