"""Benchmarks of whole flow runs: a short one for the overhead around ``fit``, or the default nightly run with
its accuracies, once per seed."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.common import FULL, RESULTS_DIR, Mode, code_commit, cpu_description, log, timed
from bench.fitclock import FitClock
from tasks.training.recipes import DEFAULT_SEED

# Every default run as it ends, one JSON line each: a three-seed run cut short keeps the seeds it finished.
DEFAULT_RUNS = RESULTS_DIR / "default-runs.jsonl"


def bench_flow(work: Path, mode: Mode, nightly: bool = False, seed: int = DEFAULT_SEED, cold: bool = True,
               record: Path = DEFAULT_RUNS) -> tuple[dict[str, Any], Path, FitClock]:
    """One flow run, as a user starts it, timed whole and inside ``model.fit``.

    By default mnist's mlp for ``mode``'s epochs; ``nightly``: the default run itself (every dataset,
    its recipe, its gates), which is what a nightly retraining pays. Also returns the published test
    accuracies and the fit calls (for the FLOPs utilization of the nightly recipes).
    """
    from flows.train import train_mnist
    from tasks.settings import BUNDLED_MIRROR, Settings

    data_dir, registry = work / f"flow-data-{seed}", work / f"flow-registry-{seed}"
    where = {"source": str(BUNDLED_MIRROR), "registry": str(registry), "data_dir": str(data_dir), "seed": seed}
    run = (dict(where) if nightly else
           dict(where, dataset="mnist", model="mlp", epochs=mode.epochs, train_rows=mode.train_rows,
                min_accuracy=0.0, min_class_recall=0.0))
    with FitClock().installed() as clock:
        wall, versions = timed(lambda: train_mnist(**run))
    accuracy = published_accuracies(Settings(data_dir=data_dir).runs_dir, versions)
    if nightly:
        append_default_run({"seed": seed, "accuracy": accuracy, "wall_seconds": round(wall, 1),
                            "fit_seconds": round(clock.seconds, 1), "cold": cold}, record)
    return {"overhead_fraction": (wall - clock.seconds) / wall, "accuracy": accuracy, "flow_wall_seconds": wall,
            "details": {"run": "nightly default" if nightly else f"mnist mlp, {mode.epochs} epochs", "seed": seed,
                        "wall_seconds": wall, "fit_seconds": clock.seconds, "samples": clock.samples,
                        "fit_seconds_by_run": {label: sum(c.seconds for c in clock.calls if c.label == label)
                                               for label in clock.labels()},
                        "published": versions, "task_seconds": task_durations()}}, data_dir, clock


def bench_more_seeds(work: Path, first: dict[str, Any] | None, seeds: list[int],
                     recorded: dict[int, dict[str, Any]] | None = None, record: Path = DEFAULT_RUNS) -> dict[str, Any]:
    """The default run again for each further seed: the accuracies' mean over all seeds, and every run.

    Later runs find the first run's data stages in the result cache (training and evaluation are
    per seed), so only the first run's wall time is a cold run's. Seeds in ``recorded`` (``--resume``: default
    runs of the same recipes on this CPU, from the record) are taken from it instead of run again.
    """
    recorded = recorded or {}
    runs = [] if first is None else [{"seed": first["details"]["seed"], "accuracy": first["accuracy"],
                                      "wall_minutes": first["flow_wall_seconds"] / 60, "cold": True}]
    for seed in seeds:
        if seed in recorded:
            log(f"default run, seed {seed}: from {record} ({recorded[seed]['finished']})")
            runs.append({"seed": seed, "accuracy": recorded[seed]["accuracy"], "cold": recorded[seed].get("cold", False),
                         "wall_minutes": recorded[seed]["wall_seconds"] / 60, "from_record": recorded[seed]["finished"]})
            continue
        log(f"default run, seed {seed} ...")
        out = bench_flow(work, FULL, nightly=True, seed=seed, cold=False, record=record)[0]
        runs.append({"seed": seed, "accuracy": out["accuracy"], "wall_minutes": out["flow_wall_seconds"] / 60,
                     "cold": False})
    runs.sort(key=lambda run: not run["cold"])
    names = list(runs[0]["accuracy"])
    mean = {name: statistics.fmean(run["accuracy"][name] for run in runs) for name in names}
    # Only a cold run's wall time is a night's; of several (seeds taken from the record ran cold in their own
    # session), the fastest, as other work on the machine only ever slows a run down.
    cold = [run["wall_minutes"] for run in runs if run["cold"]]
    wall = {"nightly_wall_minutes": min(cold)} if cold else {}
    return {**{f"{name.replace('-', '_')}_accuracy": value for name, value in mean.items()}, **wall,
            "details": {"runs": runs, "mean_accuracy": mean,
                        "spread": {name: [min(r["accuracy"][name] for r in runs), max(r["accuracy"][name] for r in runs)]
                                   for name in names}}}


def bench_budget(time_ratio_repeats: int = 0) -> dict[str, Any]:
    """What a night of the shipped recipes costs against the previous recipes (research/baselines.toml): training
    FLOPs, and with ``time_ratio_repeats`` > 0 the training time measured here (fresh processes, rotated rounds),
    with the previous recipes timed again as the control."""
    from research.budget import flops_against_baseline, time_against_baseline

    flops = flops_against_baseline()
    out: dict[str, Any] = {"training_flops_ratio": flops["night"]["ratio"], "details": {"flops": flops}}
    if time_ratio_repeats:
        timing = time_against_baseline(time_ratio_repeats)
        out |= {"night_time_ratio": timing["night_time_ratio"], "control_time_ratio": timing["control_time_ratio"]}
        out["details"]["time"] = timing
    return out


def published_accuracies(runs_dir: Path, versions: dict[str, str]) -> dict[str, float]:
    """Test accuracy of each dataset's published run, from the metrics.json its evaluate stage wrote."""
    from tasks.artifacts import METRICS_FILE
    from tasks.results import read_metrics

    return {name: read_metrics(runs_dir / name / version / METRICS_FILE).test_accuracy
            for name, version in versions.items()}


def task_durations() -> dict[str, float]:
    """Run time of each task run the throwaway server has recorded (so far only the cold flow's)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    return {run.name: round(run.total_run_time.total_seconds(), 2) for run in sorted(runs, key=lambda r: r.name)}


def recorded_default_runs(seeds: list[int], record: Path = DEFAULT_RUNS) -> dict[int, dict[str, Any]]:
    """Default runs in the record for these seeds that trained today's recipes on this CPU (the same seed trains
    another model on another CPU); the latest of each seed."""
    import json

    if not record.is_file():
        return {}
    recipes, machine = current_recipes(), cpu_description()
    same_cpu = ("cpu_model", "cpu_family", "cpu_model_number")
    found: dict[int, dict[str, Any]] = {}
    for line in record.read_text().splitlines():
        try:
            run = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if (run.get("seed") in seeds and run.get("recipes") == recipes
                and all(run.get("machine", {}).get(k) == machine[k] for k in same_cpu)):
            found[run["seed"]] = run
    return found


def current_recipes() -> dict[str, dict[str, Any]]:
    """Each built-in dataset's recipe as tasks/datasets.toml gives it (its non-default fields)."""
    from tasks.datasets import load_catalog

    return {name: spec.recipe.model_dump(exclude_defaults=True) for name, spec in load_catalog().items()}


def append_default_run(run: dict[str, Any], record: Path = DEFAULT_RUNS) -> None:
    """One finished default run, with the machine, the date, the code's commit and the recipes it trained."""
    import datetime
    import json

    line = {**run, "recipes": current_recipes(), "machine": cpu_description(), "commit": code_commit(),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    record.parent.mkdir(parents=True, exist_ok=True)
    with record.open("a") as out:
        out.write(json.dumps(line) + "\n")

