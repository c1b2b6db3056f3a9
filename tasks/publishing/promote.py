"""Promotion against the champion: may a gated challenger replace the production model?

Both models are scored on the same test rows, so their predictions are paired. The challenger is
refused when its accuracy is lower than the champion's by more than a tolerance, or when it is
significantly worse by McNemar's exact test. Exactly: on the discordant rows (b = challenger right and
champion wrong, c = the reverse), p is the **two-sided** exact binomial p-value of b successes in b + c
trials at 1/2, and the rule refuses when **c > b and p < alpha** (alpha = 0.05). That is a one-sided test
of "the challenger is worse" at level alpha / 2 = 0.025; a challenger that is significantly better is
never refused. Pure functions only; loading the champion and predicting happen in ``tasks.publishing.publish``,
under the dataset's lock.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import binomtest

DEFAULT_TOLERANCE = 0.005  # half a point of accuracy
DEFAULT_ALPHA = 0.05
RULE_TOLERANCE = "tolerance"
RULE_MCNEMAR = "mcnemar"


class PromotionPolicy(BaseModel):
    """How much worse than the champion a challenger may look and still be published."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0.0, le=1.0,
                             description="Largest accepted accuracy drop (0.005 = half a point)")
    alpha: float = Field(default=DEFAULT_ALPHA, gt=0.0, lt=1.0, description="Significance level of McNemar's exact test")


class PromotionDecision(BaseModel):
    """The champion comparison, recorded in ``metrics.json`` and the model card."""

    promoted: bool
    champion_version: str | None  # None: first version of the dataset, the absolute gates alone decided
    challenger_accuracy: float
    champion_accuracy: float | None = None
    test_rows: int
    challenger_only_right: int | None = None  # b: challenger right, champion wrong
    champion_only_right: int | None = None  # c: champion right, challenger wrong
    p_value: float | None = None  # McNemar exact, two-sided
    tolerance: float
    alpha: float
    refused_by: list[str] = Field(default_factory=list)  # names of the rules that refused
    reasons: list[str]  # one line per rule, passed or failed


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b + c trials at p = 0.5."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, found b={b}, c={c}")
    if b + c == 0:
        return 1.0  # the models agree on every row: no evidence either way
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def discordant_counts(labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray) -> tuple[int, int]:
    """(b, c): rows only the challenger gets right, rows only the champion gets right."""
    _check_paired(labels, challenger, champion)
    challenger_right, champion_right = challenger == labels, champion == labels
    return int(np.sum(challenger_right & ~champion_right)), int(np.sum(champion_right & ~challenger_right))


def first_version_decision(labels: np.ndarray, challenger: np.ndarray, policy: PromotionPolicy) -> PromotionDecision:
    """No champion yet: the absolute gates alone decide; recorded as such."""
    _check_paired(labels, challenger)
    accuracy = float(np.mean(challenger == labels))
    return PromotionDecision(
        promoted=True, champion_version=None, challenger_accuracy=accuracy, test_rows=len(labels),
        tolerance=policy.tolerance, alpha=policy.alpha,
        reasons=["PASS no champion: first version of this dataset, the absolute gates alone decide"],
    )


def decide_promotion(labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray, champion_version: str,
                     policy: PromotionPolicy) -> PromotionDecision:
    """Compare paired predicted classes of challenger and champion on the same test rows."""
    b, c = discordant_counts(labels, challenger, champion)
    n = len(labels)
    challenger_accuracy, champion_accuracy = float(np.mean(challenger == labels)), float(np.mean(champion == labels))
    p_value = mcnemar_exact_p(b, c)
    drop = (c - b) / n  # champion accuracy minus challenger accuracy, exactly
    refused_by: list[str] = []
    reasons: list[str] = []

    # Compared in rows, so a drop of exactly the tolerance is not refused through float rounding.
    if c - b > policy.tolerance * n + 1e-9:
        refused_by.append(RULE_TOLERANCE)
        reasons.append(f"FAIL {RULE_TOLERANCE}: accuracy {challenger_accuracy:.4f} is {drop:.4f} below champion "
                       f"{champion_version}'s {champion_accuracy:.4f}, more than tolerance {policy.tolerance:.4f}")
    else:
        reasons.append(f"PASS {RULE_TOLERANCE}: accuracy {challenger_accuracy:.4f} vs champion {champion_version}'s "
                       f"{champion_accuracy:.4f} (drop {max(drop, 0.0):.4f} <= tolerance {policy.tolerance:.4f})")
    counts = f"b={b} challenger-only right, c={c} champion-only right, p={p_value:.4g}"
    if c > b and p_value < policy.alpha:
        refused_by.append(RULE_MCNEMAR)
        reasons.append(f"FAIL {RULE_MCNEMAR}: significantly worse than champion {champion_version} by McNemar's "
                       f"exact test ({counts} < alpha {policy.alpha})")
    else:
        reasons.append(f"PASS {RULE_MCNEMAR}: not significantly worse than champion {champion_version} ({counts}, "
                       f"alpha {policy.alpha})")
    return PromotionDecision(
        promoted=not refused_by, champion_version=champion_version, challenger_accuracy=challenger_accuracy,
        champion_accuracy=champion_accuracy, test_rows=n, challenger_only_right=b, champion_only_right=c,
        p_value=p_value, tolerance=policy.tolerance, alpha=policy.alpha, refused_by=refused_by, reasons=reasons,
    )


def refusal_message(dataset: str, version: str, decision: PromotionDecision) -> str:
    """Why ``version`` was not published: champion, both accuracies, the p-value and each refusing rule."""
    return (f"{dataset}: challenger {version} not promoted over champion {decision.champion_version}: "
            f"test accuracy {decision.challenger_accuracy:.4f} vs champion {decision.champion_accuracy:.4f} on "
            f"{decision.test_rows} rows, McNemar exact p={decision.p_value:.4g} "
            f"(b={decision.challenger_only_right}, c={decision.champion_only_right}); "
            f"refused by rule(s) {', '.join(decision.refused_by)}:\n- "
            + "\n- ".join(r for r in decision.reasons if r.startswith("FAIL")))


def _check_paired(labels: np.ndarray, *predictions: np.ndarray) -> None:
    if len(labels) == 0:
        raise ValueError("no test rows to compare on")
    for name, pred in zip(("challenger", "champion"), predictions, strict=False):
        if np.shape(pred) != np.shape(labels):
            raise ValueError(f"{name} predictions have shape {np.shape(pred)}, expected {np.shape(labels)} "
                             "(one class per test row)")
