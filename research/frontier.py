"""Accuracy against CPU-minutes: each dataset's nightly recipe, and the baseline it replaced, at fractions of
their nightly epochs.

``python bench/run.py --frontier [--budgets 0.5,1.0,1.5] [--seeds 42,43,44] [--recipes shipped,baseline]`` writes
``frontier.json`` (every run), ``frontier.md`` (the table) and ``frontier.png`` (the plot) to
``--frontier-dir`` (default ``bench/``). Each point is ``tasks.training.train.train_model`` +
``tasks.evaluation.evaluate.evaluate_model`` on the full test split, in this process; CPU time is the process's
(all threads, ``time.process_time``), so it counts both cores' work.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import code_commit, keep_record
from research import RESULTS_DIR
from research.frontier_report import markdown, summarize, write_report

# The frontier's table and plot sit beside the other benchmarks' outputs.
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
DEFAULT_BUDGETS = "0.5,1.0,1.5"
# shipped: tasks/datasets.toml's recipes; baseline: the recipes before the accuracy campaign (research/baselines.toml).
RECIPE_SETS = ("shipped", "baseline")
DEFAULT_SEEDS = "42"
OUTPUT_NAMES = {"json": "frontier.json", "markdown": "frontier.md", "plot": "frontier.png"}


def parse_floats(text: str, what: str, low: float, high: float) -> list[float]:
    """Comma-separated numbers in (low, high], e.g. ``0.25,0.5,1``."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {item!r} is not a number (expected e.g. 0.25,0.5,1.0)") from None
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{what}: {value} is outside ({low}, {high}]")
        values.append(value)
    return values


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds: {text!r} is not a list of integers (expected e.g. 42,43,44)") from None


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--frontier", action="store_true",
                       help="train each dataset's recipe at several budgets; write accuracy vs CPU-minutes")
    group.add_argument("--budgets", type=lambda t: parse_floats(t, "budgets", 0.0, 4.0),
                       default=parse_floats(DEFAULT_BUDGETS, "budgets", 0.0, 4.0),
                       help=f"fractions of the recipe's nightly epochs (default {DEFAULT_BUDGETS})")
    group.add_argument("--seeds", type=parse_seeds, default=parse_seeds(DEFAULT_SEEDS),
                       help=f"one run per seed and budget (default {DEFAULT_SEEDS}); the table gives the mean. "
                            "With --nightly: one default run per seed, accuracies averaged")
    group.add_argument("--recipes", type=parse_recipe_sets, default=list(RECIPE_SETS),
                       help="which recipes: shipped (tasks/datasets.toml), baseline (research/baselines.toml), or both "
                            "(default)")
    group.add_argument("--datasets", default="all", help="built-in dataset names separated by commas (default all)")
    group.add_argument("--train-rows", type=int, default=None,
                       help="use only the first N train rows (a tiny test run; the test split stays whole)")
    group.add_argument("--frontier-dir", type=Path, default=BENCH_DIR, help="where the outputs go (default bench/)")


def parse_recipe_sets(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",")]
    unknown = sorted(set(chosen) - set(RECIPE_SETS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"recipes: unknown {unknown}; expected some of {', '.join(RECIPE_SETS)}")
    return list(dict.fromkeys(chosen))


def recipes_of(dataset: str, recipe_sets: list[str]) -> dict[str, Any]:
    """``dataset``'s recipes by label; a baseline that is the shipped recipe is measured once, as shipped."""
    from research.step_time import baseline_recipes
    from tasks.datasets import load_catalog

    found = {"shipped": load_catalog()[dataset].recipe, "baseline": baseline_recipes().get(dataset)}
    out: dict[str, Any] = {}
    for label in recipe_sets:
        recipe = found[label]
        if recipe is not None and recipe_key(recipe) not in {recipe_key(r) for r in out.values()}:
            out[label] = recipe
    return out


def epochs_for(budget: float, nightly_epochs: int) -> int:
    """The budget's share of the nightly epochs, rounded half up, at least one."""
    return max(1, int(budget * nightly_epochs + 0.5))


def prepare_parquet(spec, work: Path) -> dict[str, Path]:
    """The bundled splits as Parquet, with the pipeline's converter (bytes checked against the catalog first)."""
    from tasks import storage
    from tasks.conversion.convert import convert_to_parquet
    from tasks.settings import BUNDLED_MIRROR

    out = {}
    for split in ("train", "test"):
        entry = spec.split(split)
        src = BUNDLED_MIRROR / entry.path
        found = storage.sha256_file(src)
        if found != entry.sha256:
            raise ValueError(f"{src}: sha256 {found}, expected {entry.sha256} (datasets.toml)")
        out[split] = convert_to_parquet(src, work / spec.name / f"{split}.parquet", bool(spec.header))
    return out


def recipe_key(recipe) -> str:
    """What makes points comparable: the recipe as datasets.toml gives it (a changed recipe starts afresh)."""
    return recipe.model_dump_json()


def point_key(point: dict[str, Any]) -> tuple:
    return point["dataset"], point["recipe"], point["budget"], point["seed"], point["train_rows"]


def measure_point(spec, label: str, recipe, parquets: dict[str, Path], budget: float, seed: int,
                  train_rows: int | None, work: Path) -> dict[str, Any]:
    """Train ``recipe`` for ``budget`` of its epochs, evaluate on the test split; accuracy, CPU and wall time."""
    from bench.fitclock import FitClock
    from tasks.artifacts import CURVES_JSON
    from tasks.evaluation.evaluate import evaluate_model
    from tasks.training.recipes import train_config_for
    from tasks.training.train import train_model

    config = train_config_for(recipe, epochs=epochs_for(budget, recipe.epochs), seed=seed, train_rows=train_rows)
    out_dir = work / "runs" / f"{spec.name}-{label}-{budget}-{seed}"
    cpu, wall = time.process_time(), time.perf_counter()
    with FitClock().installed() as clock:
        model_path = train_model(parquets["train"], spec.num_classes, config, out_dir)
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
    cpu, wall = time.process_time(), time.perf_counter()
    metrics = evaluate_model(model_path, parquets["test"], list(spec.class_names), out_dir).metrics
    eval_cpu, eval_wall = time.process_time() - cpu, time.perf_counter() - wall
    curves = json.loads((out_dir / CURVES_JSON).read_text())
    return {"dataset": spec.name, "model": config.model, "budget": budget, "epochs": config.epochs,
            "recipe": recipe_key(recipe), "recipe_name": label,
            "epochs_run": len(next(iter(curves.values()))), "seed": seed, "train_rows": train_rows or "all",
            "test_accuracy": metrics.test_accuracy, "test_rows": metrics.test_rows,
            "cpu_minutes": (train_cpu + eval_cpu) / 60, "wall_minutes": (train_wall + eval_wall) / 60,
            "train_cpu_seconds": train_cpu, "eval_cpu_seconds": eval_cpu, "train_wall_seconds": train_wall,
            "eval_wall_seconds": eval_wall, "fit_seconds": clock.seconds, "commit": code_commit(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_frontier(datasets: str, budgets: list[float], seeds: list[int], train_rows: int | None, out_dir: Path,
                 meta: dict[str, Any], recipe_sets: tuple[str, ...] | list[str] = RECIPE_SETS) -> dict[str, Any]:
    """Every (dataset, recipe, budget, seed) point, cheapest budgets first; outputs rewritten after each point.

    Points already in ``out_dir``'s frontier.json for the same recipes are kept and not measured again,
    so the frontier can be built in pieces, by several processes at once (the merge is under a lock).
    """
    from tasks.datasets import load_catalog, select_datasets

    specs = select_datasets(load_catalog(), [name.strip() for name in datasets.split(",")])
    chosen = {spec.name: recipes_of(spec.name, list(recipe_sets)) for spec in specs}
    # Points of every dataset's shipped and baseline recipes stay in the file, whichever this run measures.
    recipes = {name: {recipe_key(r) for r in recipes_of(name, list(RECIPE_SETS)).values()} for name in load_catalog()}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = train_rows or "all"
    report = merge_point(out_dir, recipes, meta, None)
    done = {point_key(p) for p in report["points"]}
    with tempfile.TemporaryDirectory(prefix="train-mnist-frontier-") as tmp:
        work = Path(tmp)
        parquets: dict[str, dict[str, Path]] = {}
        for budget in sorted(budgets):
            for spec in specs:
                for label, recipe in chosen[spec.name].items():
                    for seed in seeds:
                        where = f"{spec.name} {label} budget {budget:g} seed {seed}"
                        if (spec.name, recipe_key(recipe), budget, seed, rows) in done:
                            print(f"[frontier] {where}: kept from {out_dir}", flush=True)
                            continue
                        if spec.name not in parquets:
                            parquets[spec.name] = prepare_parquet(spec, work)
                        point = measure_point(spec, label, recipe, parquets[spec.name], budget, seed, train_rows, work)
                        print(f"[frontier] {where} ({point['epochs']} epochs): {100 * point['test_accuracy']:.2f} %, "
                              f"{point['cpu_minutes']:.2f} CPU-min, {point['wall_minutes']:.2f} min", flush=True)
                        report = merge_point(out_dir, recipes, meta, point)
    return report


def merge_point(out_dir: Path, recipes: dict[str, set[str]], meta: dict[str, Any],
                point: dict[str, Any] | None) -> dict[str, Any]:
    """frontier.json's points of the recipes kept (``recipes``: each dataset's recipe keys), plus ``point``; the
    outputs rewritten. Under a file lock."""
    import fcntl

    with (out_dir / ".frontier.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out_dir / OUTPUT_NAMES["json"]
        earlier = json.loads(path.read_text()) if path.exists() else {}
        points = [p for p in earlier.get("points", []) if p.get("recipe") in recipes.get(p["dataset"], ())]
        commands = earlier.get("commands", []) if points else []
        if point is not None:
            points = [p for p in points if point_key(p) != point_key(point)] + [point]
            point["command"] = meta["command"]
            commands = list(dict.fromkeys([*commands, meta["command"]]))
        report = {**meta, "commands": commands, "points": points, "summary": summarize(points),
                  "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if points:
            write_outputs(report, out_dir)
    return report


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    paths = {kind: out_dir / name for kind, name in OUTPUT_NAMES.items()}  # one stem: the views sit beside the JSON
    write_report(report, paths["json"])
    return paths


def main(args: argparse.Namespace, machine: dict[str, Any]) -> int:
    command = (f"python bench/run.py --frontier --budgets {','.join(f'{b:g}' for b in args.budgets)} "
               f"--seeds {','.join(map(str, args.seeds))} --recipes {','.join(args.recipes)}"
               + (f" --datasets {args.datasets}" if args.datasets != "all" else "")
               + (f" --train-rows {args.train_rows}" if args.train_rows else ""))
    report = run_frontier(args.datasets, args.budgets, args.seeds, args.train_rows, args.frontier_dir,
                          {"command": command, "machine": machine}, args.recipes)
    if not report["points"]:
        print("no frontier points measured or kept", file=sys.stderr)
        return 1
    print(markdown(report["summary"], report))
    kept = keep_record("frontier", report, RESULTS_DIR) if args.frontier_dir == BENCH_DIR else None  # not a test's tiny run
    print("wrote " + ", ".join(str(args.frontier_dir / name) for name in OUTPUT_NAMES.values())
          + (f" and {kept}" if kept else ""))
    return 0
