"""Stage 6: decide whether a model may be published. Gates are data; the decision is a value."""

from __future__ import annotations

from prefect import task

from tasks.datasets import Gates
from tasks.results import GateDecision, Metrics


def check_gates(metrics: Metrics, gates: Gates) -> GateDecision:
    """Overall accuracy >= ``gates.min_accuracy`` and every class's recall >= ``gates.min_class_recall``."""
    reasons: list[str] = []
    ok = metrics.test_accuracy >= gates.min_accuracy
    reasons.append(f"{'PASS' if ok else 'FAIL'} min_accuracy: test_accuracy {metrics.test_accuracy:.4f} "
                   f"{'>=' if ok else '<'} threshold {gates.min_accuracy:.4f}")
    passed = ok
    for name, recall in metrics.recall.items():
        ok = recall >= gates.min_class_recall
        passed &= ok
        if not ok:
            reasons.append(f"FAIL min_class_recall: class {name!r} recall {recall:.4f} < threshold "
                           f"{gates.min_class_recall:.4f}")
    if passed:
        worst = min(metrics.recall, key=metrics.recall.__getitem__)
        reasons.append(f"PASS min_class_recall: lowest class recall {metrics.recall[worst]:.4f} ({worst!r}) >= "
                       f"threshold {gates.min_class_recall:.4f}")
    return GateDecision(passed=passed, reasons=reasons)


# ---- Prefect wrapper -----------------------------------------------------------------------------


@task(name="gate", task_run_name="gate-{dataset}")
def gate_task(metrics: Metrics, gates: Gates, dataset: str) -> GateDecision:
    from prefect import get_run_logger

    decision = check_gates(metrics, gates)
    log = get_run_logger().info if decision.passed else get_run_logger().error
    log("%s gate %s:\n- %s", dataset, "passed" if decision.passed else "FAILED", "\n- ".join(decision.reasons))
    return decision
