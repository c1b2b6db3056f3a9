"""The accuracy campaign's budget (issue 25): what a night of the shipped recipes (tasks/datasets.toml) costs
against the recipes before the campaign (research/baselines.toml), in training FLOPs (counted from the networks'
layers) and in training time (measured on this machine, research/step_time.py)."""

from __future__ import annotations

from typing import Any

from research.step_time import FULL_TRAIN_ROWS, baseline_config, time_ratios, whole_night

TIME_STEPS = 150  # steps timed per model and process: long enough to time, short enough for several rounds


def night_training_flops(config, num_classes: int = 10) -> int:
    """FLOPs of ``config``'s night of training on the full train split: about three forward passes per fit row
    and epoch (bench.flops)."""
    from bench.flops import TRAIN_STEP_FORWARD_MULTIPLE, model_forward_flops
    from tasks.training.architectures import build_model
    from tasks.training.fitting import split_rows

    _, fit_idx = split_rows(config, config.train_rows or FULL_TRAIN_ROWS)
    forward = model_forward_flops(build_model(config, num_classes))
    return TRAIN_STEP_FORWARD_MULTIPLE * forward * len(fit_idx) * config.epochs


def shipped_configs() -> dict[str, Any]:
    """Each built-in dataset's nightly TrainConfig, as the default run trains it."""
    from tasks.datasets import load_catalog
    from tasks.training.recipes import train_config_for

    return {name: train_config_for(spec.recipe) for name, spec in load_catalog().items()}


def flops_against_baseline() -> dict[str, Any]:
    """Per dataset and for the whole night: the shipped recipe's training FLOPs, the baseline's, and their ratio."""
    shipped = {name: night_training_flops(config) for name, config in shipped_configs().items()}
    baseline = {name: night_training_flops(baseline_config(name)) for name in shipped}
    rows = {name: {"shipped": shipped[name], "baseline": baseline[name], "ratio": round(shipped[name] / baseline[name], 3)}
            for name in shipped}
    night = {"shipped": sum(shipped.values()), "baseline": sum(baseline.values())}
    return {"per_dataset": rows, "night": {**night, "ratio": round(night["shipped"] / night["baseline"], 3)}}


def time_against_baseline(fresh_repeats: int, steps: int = TIME_STEPS) -> dict[str, Any]:
    """The shipped recipes' training time of a night as a ratio of the baseline's, each model timed in
    ``fresh_repeats`` fresh processes in rotated order, and the baseline timed again as a control (its ratio is
    the measurement's noise: the issue trusts a measurement whose control is within 5 % of 1.0)."""
    candidates = [{"name": f"{name}: shipped recipe", "dataset": name, **config.model_dump(exclude={"seed", "train_rows"})}
                  for name, config in shipped_configs().items()]
    rows = time_ratios(candidates, steps, "float32", fresh_repeats)
    nights = {row["name"]: row for row in whole_night(rows)}
    control = nights["the night: controls"]["time_ratio"]
    return {"steps": steps, "fresh_process_repeats": fresh_repeats, "per_dataset": rows,
            "night_time_ratio": nights["the night: candidates"]["time_ratio"], "control_time_ratio": control,
            "trusted": abs(control - 1.0) <= 0.05}
