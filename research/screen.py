"""Screen training recipes fast: several seeds of each candidate, in parallel processes, on any Keras backend.

A candidate is a dataset and ``TrainConfig`` fields (``research/candidates.toml``). Each run builds the model
with ``tasks.training.architectures.build_model`` (the pipeline's own networks and optimizers), fits it on the
bundled train split (a seeded hold-out with early stopping when ``validation_fraction`` > 0, as
``tasks.training.train`` does) and scores the test split. Made for a GPU machine with JAX and no TensorFlow:

    KERAS_BACKEND=jax python research/screen.py --seeds 42,43,44 --jobs 6 --out screen.jsonl

The numbers rank recipes; they are not the pipeline's numbers (another backend, another device, one
``fit`` call instead of one per epoch): confirm a recipe with ``python bench/run.py --nightly --seeds``.
Each finished run is one JSON line in ``--out``, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_description, keep_record  # noqa: E402
from research import RESULTS_DIR  # noqa: E402

CANDIDATES = Path(__file__).with_name("candidates.toml")
MIRROR = ROOT / "data" / "mirror"


def load_split(dataset: str, split: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (N, 784), labels) of a bundled split, parsed once and kept as .npz in ``cache``."""
    saved = cache / f"{dataset}-{split}.npz"
    if not saved.is_file():
        from tasks.datasets import load_catalog

        spec = load_catalog()[dataset]
        rows = pd.read_csv(MIRROR / spec.split(split).path, header=0 if spec.header else None, dtype=np.uint8)
        rows = rows.to_numpy()
        np.savez(saved, x=rows[:, 1:], y=rows[:, 0])
    with np.load(saved) as arrays:
        return arrays["x"], arrays["y"]


def run_one(job: dict) -> dict:
    """Train one candidate at one seed; its test accuracy, cost and time."""
    import keras

    from bench.flops import TRAIN_STEP_FORWARD_MULTIPLE, model_forward_flops
    from research.budget import night_training_flops
    from research.step_time import baseline_config
    from tasks.training.architectures import as_float32, build_model, with_test_time_views
    from tasks.training.fitting import split_rows, training_targets
    from tasks.training.recipes import TrainConfig

    config = TrainConfig(**job["config"], seed=job["seed"])
    keras.utils.set_random_seed(config.seed)
    x, y = load_split(job["dataset"], "train", Path(job["cache"]))
    x, y = x[:config.train_rows], y[:config.train_rows]
    x_test, y_test = load_split(job["dataset"], "test", Path(job["cache"]))
    num_classes = int(y.max()) + 1
    targets = training_targets(config, y, num_classes)
    val_idx, fit_idx = split_rows(config, len(y))
    steps = math.ceil(len(fit_idx) / config.batch_size)
    model = build_model(config, num_classes, steps_per_epoch=steps)
    callbacks = []
    validation = None
    if len(val_idx):
        validation = (x[val_idx].astype(np.float32), targets[val_idx])
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                                       restore_best_weights=not config.ema))
    start = time.perf_counter()
    history = model.fit(x[fit_idx].astype(np.float32), targets[fit_idx], validation_data=validation,
                        epochs=config.epochs, batch_size=config.batch_size, shuffle=True, verbose=0,
                        callbacks=callbacks)
    seconds = time.perf_counter() - start
    saved = as_float32(model, config, num_classes)  # the model the pipeline would save
    probabilities = with_test_time_views(saved, config.test_time_views).predict(x_test.astype(np.float32), batch_size=2048, verbose=0)
    # The same weights averaged over the five 1-pixel-shifted views: what test_time_views = "shifts" would give.
    shifted = with_test_time_views(saved, "shifts").predict(x_test.astype(np.float32), batch_size=2048, verbose=0)
    flops = TRAIN_STEP_FORWARD_MULTIPLE * model_forward_flops(model) * len(fit_idx) * len(history.epoch)
    budget = night_training_flops(baseline_config(job["dataset"]), num_classes)  # research/baselines.toml
    return {"name": job["name"], "dataset": job["dataset"], "seed": config.seed,
            "test_accuracy": float((probabilities.argmax(axis=1) == y_test).mean()),
            "test_accuracy_with_shift_views": float((shifted.argmax(axis=1) == y_test).mean()),
            "epochs_run": len(history.epoch), "fit_seconds": round(seconds, 1), "training_flops": flops,
            "budget_ratio": round(flops / budget, 3), "config": job["config"],
            "backend": keras.backend.backend()}


def _worker(job: dict) -> dict:
    try:
        return run_one(job)
    except Exception as exc:  # noqa: BLE001 - one broken candidate must not end the screen
        return {"name": job["name"], "seed": job["seed"], "error": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=Path, default=CANDIDATES)
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/train-mnist-screen"))
    parser.add_argument("--out", type=Path, help="JSON lines, one per finished run (required unless --time-steps)")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="instead of training: time this many steps of each candidate and of today's recipe, "
                             "and print each candidate's training time as a ratio of today's (research/step_time.py)")
    parser.add_argument("--fresh", type=int, default=0, metavar="REPEATS",
                        help="with --time-steps: time each model in a fresh process, alternating, REPEATS times")
    parser.add_argument("--policy", default="float32", choices=("float32", "mixed_bfloat16"),
                        help="with --time-steps: the Keras dtype policy the candidates are timed under")
    args = parser.parse_args(argv)
    candidates = tomllib.loads(args.candidates.read_text())["candidate"]
    if args.only:
        wanted = set(args.only.split(","))
        candidates = [c for c in candidates if c["name"] in wanted]
    if args.time_steps:
        return time_main(candidates, args.time_steps, args.policy, args.fresh)
    if args.out is None:
        parser.error("--out is required to screen")
    args.cache.mkdir(parents=True, exist_ok=True)
    for dataset in sorted({c["dataset"] for c in candidates}):  # parse each split once, before the workers start
        for split in ("train", "test"):
            load_split(dataset, split, args.cache)
    seeds = [int(s) for s in args.seeds.split(",")]
    # Every candidate's first seed before any second seed: a screen cut short still ranks all of them.
    jobs = [{"name": c["name"], "dataset": c["dataset"], "config": {k: v for k, v in c.items() if k not in
             ("name", "dataset")}, "seed": seed, "cache": str(args.cache)} for seed in seeds for c in candidates]
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share one GPU
    runs = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool, open(args.out, "a") as out:
        for result in pool.imap_unordered(_worker, jobs):
            out.write(json.dumps(result) + "\n")
            out.flush()
            print(json.dumps(result), flush=True)
            runs.append(result)
    means = summary(runs)
    for name, row in means.items():
        print(f"{name:32} {row['mean_accuracy']:.4f} over seeds {row['seeds']} (budget ratio {row['budget_ratio']})")
    kept = keep("screen", means=means, runs=runs)
    print(f"wrote {args.out} and {kept}")
    return 0


def time_main(candidates: list[dict], steps: int, policy: str, fresh: int = 0) -> int:
    """``--time-steps``: each candidate's night of training as a ratio of its dataset's baseline recipe's, and the
    whole night's when one candidate per dataset is timed."""
    from research.step_time import time_ratios, whole_night

    rows = time_ratios(candidates, steps, policy, fresh)
    for row in rows:
        print(f"{row['name']:46} {row['policy']:15} {row['steps_per_s']:7.2f} steps/s  night {row['night_seconds']:7.1f} s"
              f"  today's {row['todays_night_seconds']:7.1f} s  time ratio {row['time_ratio']:.3f}")
    nights = whole_night(rows)
    for row in nights:
        print(f"{row['name']:46} night {row['night_seconds']:7.1f} s  today's {row['todays_night_seconds']:7.1f} s"
              f"  time ratio {row['time_ratio']:.3f}")
    kept = keep("time-ratio", steps=steps, policy=policy, fresh_process_repeats=fresh, candidates=rows,
                whole_night=nights)
    print(f"wrote {kept}")
    return 0


def keep(kind: str, **fields) -> Path:
    """This run's record in research/results: the command, the machine, and ``fields``."""
    return keep_record(kind, {"command": " ".join(["python research/screen.py", *sys.argv[1:]]),
                              "machine": {"cpus": os.cpu_count(), **cpu_description()}, **fields}, RESULTS_DIR)


def summary(runs: list[dict]) -> dict[str, dict]:
    """Each candidate's mean test accuracy over the seeds that finished."""
    out: dict[str, dict] = {}
    for run in runs:
        if "test_accuracy" in run:
            row = out.setdefault(run["name"], {"accuracies": [], "seeds": [], "budget_ratio": run["budget_ratio"]})
            row["accuracies"].append(run["test_accuracy"])
            row["seeds"].append(run["seed"])
    for row in out.values():
        row["mean_accuracy"] = sum(row["accuracies"]) / len(row["accuracies"])
    return out


if __name__ == "__main__":
    sys.exit(main())
