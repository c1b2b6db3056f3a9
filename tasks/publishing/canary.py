"""The canary: before a version becomes production, load it in a fresh Python process and score a batch.

This is what a user does (``keras.saving.load_model(path, safe_mode=True)``, raw 0..255 pixel rows
in, probabilities out), done in a new interpreter so nothing from the training process (imported
custom objects, warm graphs, loaded weights) can hide a model that does not load on its own. The
canary batch is the first batch the evaluation stage scored, whole (``CANARY_ROWS`` = ``PREDICT_BATCH``
test rows), and it is scored the same way, so the numbers are the evaluation's: the predicted classes
must equal the ones it recorded (``predictions.npy``), and every probability must be within
``PROBABILITY_TOLERANCE`` of its ``probabilities.npy``. (Scored in batches of another size, a model's
float32 sums come out in another order, and a near-tie could flip a class of a good model.) The batch and
what was recorded are kept beside the model in the registry (``canary.npz``), so the check can be repeated
on any version later: ``python -m tasks.publishing.canary <version>/model.keras <version>/canary.npz``.

Refused when the model does not load (or the process fails or hangs), any prediction differs, or the warm
latency of a ``LATENCY_ROWS``-row batch exceeds ``LATENCY_BUDGET_S``. Load time and latency are recorded
either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tasks import artifacts
from tasks.model_io import PREDICT_BATCH

CANARY_ROWS = PREDICT_BATCH
CANARY_FILE = artifacts.CANARY_FILE
# The same rows in the same batch on the same machine give the same float32 numbers; the tolerance only
# absorbs what a fresh process may order differently, far below any margin that decides a class.
PROBABILITY_TOLERANCE = 1e-4
LATENCY_ROWS = 256
# Warm latency of one 256-row batch. Measured on the 2-core CI machine: ~0.03-0.1 s for every model
# kind; the budget leaves room for a busy machine and catches a model that is pathologically slow.
LATENCY_BUDGET_S = 2.0
TIMED_CALLS = 5  # warm calls after the first; the median is the latency
SLOWER_THAN_REFERENCE = 3.0  # a new version may be this much slower than the one serving, whatever the budget
PROCESS_TIMEOUT_S = 300.0  # import + load + score; a hung canary counts as a failed load


class CanaryResult(BaseModel):
    """What the canary measured and decided; recorded in ``metrics.json`` and the model card."""

    passed: bool
    loaded: bool
    matched: bool
    rows: int
    mismatched_rows: int | None = None
    max_probability_difference: float | None = None  # against the evaluation's probabilities, when recorded
    import_s: float | None = None  # importing Keras/TensorFlow in the fresh process
    load_s: float | None = None  # keras.saving.load_model, safe mode
    first_batch_s: float | None = None  # first call, includes graph tracing
    latency_s: float | None = None  # median of the warm calls
    latency_budget_s: float
    reasons: list[str]


def write_canary_batch(pixels: np.ndarray, expected: np.ndarray, dest: Path,
                       probabilities: np.ndarray | None = None) -> Path:
    """The first ``CANARY_ROWS`` rows, the classes the evaluation predicted for them and (when given) its
    probabilities, as ``canary.npz``."""
    n = min(CANARY_ROWS, len(pixels))
    if n == 0 or len(expected) != len(pixels) or probabilities is not None and len(probabilities) != len(pixels):
        raise ValueError(f"canary batch: {len(pixels)} test rows, {len(expected)} predictions"
                         f"{'' if probabilities is None else f' and {len(probabilities)} probability rows'}; "
                         "expected the same, non-zero number")
    recorded = {} if probabilities is None else {"probabilities": np.asarray(probabilities[:n], dtype=np.float32)}
    with open(dest, "wb") as fh:
        np.savez(fh, pixels=pixels[:n], expected=np.asarray(expected[:n], dtype=np.int64), **recorded)
        fh.flush()
        os.fsync(fh.fileno())
    return dest


def decide(measured: dict, expected: np.ndarray, budget_s: float,
           expected_probabilities: np.ndarray | None = None) -> CanaryResult:
    """The verdict on what the fresh process reported (``measured``, see ``score_in_this_process``)."""
    rows = len(expected)
    timings = {k: measured.get(k) for k in ("import_s", "load_s", "first_batch_s", "latency_s")}
    if measured.get("error"):
        return CanaryResult(passed=False, loaded=bool(measured.get("loaded")), matched=False, rows=rows,
                            latency_budget_s=budget_s, reasons=[f"FAIL load: {measured['error']}"], **timings)
    predictions = np.asarray(measured["predictions"], dtype=np.int64)
    found = np.asarray(measured.get("probabilities", []), dtype=np.float64)
    reasons = []
    not_finite = int(np.size(found) - np.isfinite(found).sum())
    if not_finite:  # NaN compares unequal to everything, so no other check would notice it
        reasons.append(f"FAIL outputs: {not_finite} of {found.size} probabilities are not finite (NaN or infinite)")
    if predictions.shape != expected.shape:
        mismatched = rows
        reasons.append(f"FAIL predictions: {predictions.shape} classes for {rows} canary rows")
    else:
        mismatched = int(np.sum(predictions != expected))
        first = np.flatnonzero(predictions != expected)[:5].tolist()
        reasons.append(f"PASS predictions: all {rows} canary rows predicted as the evaluation recorded" if not mismatched
                       else f"FAIL predictions: {mismatched} of {rows} canary rows differ from the evaluation's "
                            f"predictions (first rows {first})")
    difference = None
    if expected_probabilities is not None and not mismatched and not not_finite:
        if found.shape != expected_probabilities.shape:
            difference, mismatched = float("inf"), rows
        else:
            gaps = np.abs(found - expected_probabilities).max(axis=1)
            difference, mismatched = float(gaps.max()), int(np.sum(gaps > PROBABILITY_TOLERANCE))
        close = mismatched == 0
        reasons.append(f"{'PASS' if close else 'FAIL'} probabilities: largest difference from the evaluation's "
                       f"{difference:.2e} {'<=' if close else '>'} tolerance {PROBABILITY_TOLERANCE:.0e}")
    fast = measured["latency_s"] <= budget_s
    reasons.append(f"{'PASS' if fast else 'FAIL'} latency: {measured['latency_s']:.4f} s per "
                   f"{measured.get('latency_rows', rows)}-row batch {'<=' if fast else '>'} budget {budget_s:.4f} s "
                   f"(load {measured['load_s']:.2f} s)")
    matched = mismatched == 0 and not not_finite
    return CanaryResult(passed=matched and fast, loaded=True, matched=matched, rows=rows, mismatched_rows=mismatched,
                        max_probability_difference=difference, latency_budget_s=budget_s, reasons=reasons, **timings)


def run_canary(model_path: Path, batch_path: Path, budget_s: float = LATENCY_BUDGET_S,
               timeout_s: float = PROCESS_TIMEOUT_S) -> CanaryResult:
    """Score ``batch_path`` with ``model_path`` in a fresh ``python -m tasks.publishing.canary`` process and decide."""
    expected, probabilities = recorded(batch_path)
    with tempfile.TemporaryDirectory(prefix="canary-") as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run([sys.executable, "-m", "tasks.publishing.canary", str(model_path), str(batch_path),
                                   "--json", str(out)], capture_output=True, text=True, timeout=timeout_s,
                                  cwd=tmp, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        except subprocess.TimeoutExpired:
            measured = {"error": f"the canary process loading {model_path} did not finish in {timeout_s:.0f} s"}
        else:
            if out.is_file():
                measured = json.loads(out.read_text())
            else:
                measured = {"error": f"the canary process for {model_path} exited with {proc.returncode} and no "
                                     f"result: {proc.stderr.strip()[-2000:]}"}
    return decide(measured, expected, budget_s, probabilities)


def recorded(batch_path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``canary.npz`` says the evaluation found: the classes, and the probabilities if it kept them."""
    with np.load(batch_path, allow_pickle=False) as batch:
        return batch["expected"], batch["probabilities"].astype(np.float64) if "probabilities" in batch else None


def score_in_this_process(model_path: Path, batch_path: Path) -> dict:
    """Load and score as a user would; timings and predicted classes, or the error that stopped it."""
    started = time.perf_counter()
    from tasks.model_io import import_keras, load_model

    import_keras()
    measured: dict = {"import_s": time.perf_counter() - started, "loaded": False}
    with np.load(batch_path, allow_pickle=False) as batch:
        pixels = batch["pixels"]
    try:
        started = time.perf_counter()
        model = load_model(model_path)
        measured |= {"load_s": time.perf_counter() - started, "loaded": True}
        measured |= measure(model, pixels)
    except Exception as exc:  # noqa: BLE001 - any failure is the canary's finding, reported in full
        stage = "score" if measured["loaded"] else "load"
        measured["error"] = f"{model_path} failed to {stage} in a fresh process ({type(exc).__name__}: {exc})"
    return measured


def measure(model, pixels: np.ndarray) -> dict:
    """Score the canary batch with a loaded model, as evaluation scored it; the first call's time, the warm
    latency of a ``LATENCY_ROWS``-row batch, and the classes and probabilities."""
    from tasks.model_io import score

    started = time.perf_counter()
    probabilities = score(model, pixels)  # one batch, as evaluation scored these rows
    measured = {"first_batch_s": time.perf_counter() - started}
    calls = []
    for _ in range(TIMED_CALLS):
        started = time.perf_counter()
        score(model, pixels[:LATENCY_ROWS])
        calls.append(time.perf_counter() - started)
    return measured | {"latency_s": float(np.median(calls)), "latency_rows": min(LATENCY_ROWS, len(pixels)),
                       "predictions": probabilities.argmax(axis=1).tolist(), "probabilities": probabilities.tolist()}


def check_loaded(model, batch_path: Path, load_s: float, budget_s: float = LATENCY_BUDGET_S,
                 reference_latency_s: float | None = None) -> CanaryResult:
    """The canary's verdict on a model already loaded in this process (the model server's check before it
    swaps a new version in): the same predictions and probabilities as recorded at publish, within budget.
    ``reference_latency_s``: the latency of the model serving now, timed at the same moment; a busy server
    slows both, so the budget grows to ``SLOWER_THAN_REFERENCE`` times it."""
    if reference_latency_s is not None:
        budget_s = max(budget_s, SLOWER_THAN_REFERENCE * reference_latency_s)
    expected, probabilities = recorded(batch_path)
    with np.load(batch_path, allow_pickle=False) as batch:
        pixels = batch["pixels"]
    try:
        measured = {"loaded": True, "load_s": load_s, **measure(model, pixels)}
    except Exception as exc:  # noqa: BLE001 - a model that cannot score its own canary batch is refused
        measured = {"loaded": True, "load_s": load_s, "error": f"failed to score ({type(exc).__name__}: {exc})"}
    return decide(measured, expected, budget_s, probabilities)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.publishing.canary",
                                     description="Load a model in this fresh process and score its canary batch.")
    parser.add_argument("model", type=Path, help="model.keras")
    parser.add_argument("batch", type=Path, help="canary.npz (pixels, expected)")
    parser.add_argument("--json", type=Path, help="write the raw measurements here (else print the verdict)")
    args = parser.parse_args(argv)
    measured = score_in_this_process(args.model, args.batch)
    if args.json:
        args.json.write_text(json.dumps(measured))
        return 0
    expected, probabilities = recorded(args.batch)
    result = decide(measured, expected, LATENCY_BUDGET_S, probabilities)
    print(result.model_dump_json(indent=2))
    return 0 if result.passed else 1


def markdown(result: CanaryResult) -> list[str]:
    """The canary's section of the model card."""
    timing = (f"load {result.load_s:.2f} s, first batch {result.first_batch_s:.3f} s, latency {result.latency_s:.4f} s "
              f"per {result.rows}-row batch (budget {result.latency_budget_s} s)" if result.latency_s is not None
              else "no timings (the model did not load)")
    return ["## Canary", "", f"**{'PASSED' if result.passed else 'FAILED'}** in a fresh Python process: {timing}.",
            "", *[f"- {reason}" for reason in result.reasons], ""]


if __name__ == "__main__":
    sys.exit(main())
