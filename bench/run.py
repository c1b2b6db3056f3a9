"""Benchmarks of the pipeline against a baseline measured in the same run: ``python bench/run.py [--quick|--nightly]``.

Every number is a ratio (or a per-unit time) measured within one run, so a busy shared machine
skews both sides alike. Prints a table and writes ``bench/results.json``; ``--frontier`` trains each recipe at
several budgets instead (``research/frontier.py``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = Path(__file__).with_name("results.json")
if str(PROJECT_ROOT) not in sys.path:  # run as a script, bench/ is on the path but not the project root
    sys.path.insert(0, str(PROJECT_ROOT))

from bench import flops  # noqa: E402
from bench.common import FULL, QUICK, keep_record, log, machine  # noqa: E402
from bench.data_stages import (  # noqa: E402
    bench_conversion,
    bench_layouts,
    bench_sizes,
    bench_validation,
    bench_warm_data_stages,
    train_parquets,
)
from bench.nightly import DEFAULT_RUNS, bench_budget, bench_flow, bench_more_seeds, recorded_default_runs  # noqa: E402
from bench.targets import TARGETS, table, verdict  # noqa: E402
from bench.training import bare_fit, bench_recipe_fits, bench_training, flops_utilization  # noqa: E402
from bench.training import rows_for_steps as rows_for_steps  # noqa: E402 - part of this entry point's interface
from research import frontier  # noqa: E402

# "flow" is the cold flow run; "warm" and "training" reuse its data dir, and --nightly's "flops" its fits;
# "budget" (--nightly only): the shipped recipes' FLOPs and, with --time-ratio, time against the previous recipes.
STEPS = ("conversion", "sizes", "validation", "flow", "warm", "training", "flops", "budget")


def steps_of(text: str) -> set[str]:
    steps = {s.strip() for s in text.split(",")}
    unknown = steps - set(STEPS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {sorted(unknown)}; expected some of {', '.join(STEPS)}")
    return steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, 1 epoch on 10,000 rows (a smoke run)")
    parser.add_argument("--layouts", action="store_true", help="also compare candidate Parquet layouts")
    parser.add_argument("--serving", action="store_true",
                        help="only: train-mnist serve against mlflow models serve (bench/serving.py, ~3 min)")
    parser.add_argument("--server-load", action="store_true",
                        help="only: many concurrent flow runs against a Prefect server on SQLite and on PostgreSQL (~10 min)")
    parser.add_argument("--nightly", action="store_true",
                        help="overhead, accuracies and FLOPs utilization of the default nightly run (~25 min on 2 cores)")
    parser.add_argument("--resume", action="store_true",
                        help="with --nightly: take seeds already in bench/results/default-runs.jsonl (same recipes, "
                             "same CPU) from the record instead of running them again")
    parser.add_argument("--default-runs", type=Path, default=DEFAULT_RUNS,
                        help="with --nightly: the record each default run is appended to (default %(default)s)")
    parser.add_argument("--time-ratio", type=int, default=0, metavar="REPEATS",
                        help="with --nightly: also time a night of the shipped recipes against the previous ones, "
                             "each model in REPEATS fresh processes (5: ~20 min; on a quiet machine)")
    parser.add_argument("--only", type=steps_of, default=set(STEPS),
                        help=f"run only these steps, separated by commas: {','.join(STEPS)} (default all)")
    parser.add_argument("--output", type=Path, default=RESULTS_FILE, help=f"default {RESULTS_FILE.relative_to(PROJECT_ROOT)}")
    frontier.add_arguments(parser.add_argument_group("frontier (accuracy vs CPU-minutes; bench/README.md)"))
    parser.add_argument("--bare-fit", nargs=3, metavar=("PARQUET", "CONFIG_JSON", "plain|deterministic"),
                        help=argparse.SUPPRESS)  # internal: the baseline's own process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_fit:
        parquet, config_json, kind = args.bare_fit
        print(json.dumps(bare_fit(Path(parquet), config_json, deterministic=kind == "deterministic")))
        return 0
    if args.frontier:
        return frontier.main(args, machine())
    if args.serving:
        return serving_main(args)
    if args.server_load:
        return server_load_main(args)

    mode = QUICK if args.quick else FULL
    if args.nightly and "flops" in args.only:
        args.only.add("flow")  # the nightly utilization is measured on the flow's own fits
    command = "python bench/run.py" + "".join(f" --{flag}" for flag in ("quick", "nightly", "layouts")
                                              if getattr(args, flag))
    if args.nightly:
        command += (" --seeds " + ",".join(map(str, args.seeds)) + (" --resume" if args.resume else "")
                    + (f" --time-ratio {args.time_ratio}" if args.time_ratio else ""))
    recorded = recorded_default_runs(args.seeds, args.default_runs) if args.nightly and args.resume else {}
    to_run = [seed for seed in args.seeds if seed not in recorded]
    if args.nightly and not to_run:  # every seed is in the record: nothing to run, so nothing to time
        args.only -= {"flow", "warm", "training", "flops"}
    if args.only != set(STEPS):
        command += " --only " + ",".join(s for s in STEPS if s in args.only)
    work = Path(tempfile.mkdtemp(prefix="train-mnist-bench-"))
    # A throwaway result store: the cold run must not find cache records from earlier runs.
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(work / "prefect-storage")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    results: dict[str, Any] = {"command": command, "mode": "quick" if args.quick else "full", "machine": machine(),
                               "details": {}}
    started = time.perf_counter()

    def record(name: str, out: dict[str, Any]) -> None:
        results["details"][name] = out.pop("details")
        results.update(out)

    try:
        for name, step in (("conversion", lambda: bench_conversion(work, mode)), ("sizes", lambda: bench_sizes(work)),
                           ("validation", lambda: bench_validation(work, mode))):
            if name in args.only:
                log(f"{name} ...")
                record(name, step())
        if "flops" in args.only:
            log("float32 matmul rate ...")
            matmul = flops.matmul_flops_per_second()
        if args.only & {"flow", "warm", "training"}:
            from prefect.testing.utilities import prefect_test_harness

            log("starting a throwaway Prefect server (not timed) ...")
            with prefect_test_harness(server_startup_timeout=120):
                log("cold flow run ...")
                out, data_dir, flow_fits = bench_flow(work, mode, nightly=args.nightly, seed=to_run[0],
                                                      record=args.default_runs)
                if args.nightly:  # before record() takes the details out
                    first_run = {"accuracy": out["accuracy"], "flow_wall_seconds": out["flow_wall_seconds"],
                                 "details": {"seed": to_run[0]}}
                record("flow", out)
                if "warm" in args.only:
                    log("warm data stages ...")
                    record("warm", bench_warm_data_stages(data_dir))
                if "training" in args.only:
                    train_parquet = next((data_dir / "parquet" / "mnist").glob("train-*.parquet"))
                    log("training throughput ...")
                    record("training", bench_training(work, train_parquet, mode))
                if args.nightly:
                    record("seeds", bench_more_seeds(work, first_run, [s for s in args.seeds if s != to_run[0]],
                                                     recorded, args.default_runs))
        elif args.nightly:
            record("seeds", bench_more_seeds(work, None, args.seeds, recorded, args.default_runs))
        if "flops" in args.only:
            if args.nightly:
                fits, source = flow_fits, "the nightly flow's fits"
            else:
                log(f"recipe fits for FLOPs utilization (2 epochs of {mode.recipe_steps} steps each) ...")
                fits = bench_recipe_fits(work, train_parquets(work), mode.recipe_steps)
                source = f"train_model, each recipe, 2 epochs of {mode.recipe_steps} batches"
            # The better of two measurements, before and after training, is the machine's rate in this run.
            after = flops.matmul_flops_per_second()
            matmul = dict(max(matmul, after, key=lambda m: m["flops_per_second"]),
                          flops_per_cpu_second=max(matmul["flops_per_cpu_second"], after["flops_per_cpu_second"]),
                          before_after_flops_per_second=[matmul["flops_per_second"], after["flops_per_second"]])
            record("flops", flops_utilization(fits, matmul, source))
        if args.nightly and "budget" in args.only:
            log("the recipes' budget against the previous recipes"
                + (f" (timing, {args.time_ratio} fresh processes per model) ..." if args.time_ratio else " ..."))
            record("budget", bench_budget(args.time_ratio))
        if args.layouts:
            log("Parquet layouts ...")
            results["parquet_layouts"] = bench_layouts(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - started
    results["targets_met"] = {m: verdict(m, results[m]) for m in TARGETS if m in results}
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    kept = keep_record("nightly" if args.nightly else results["mode"], results)
    print(f"{command}  ({results['mode']}, {results['machine']['cpus']} CPUs {results['machine']['cpu_model']}, "
          f"load {results['machine']['load_average_at_start'][0]:.1f})")
    print(table(results))
    for dataset, layouts in results.get("parquet_layouts", {}).items():
        print(f"\nParquet layouts, {dataset} train (size / .csv.gz, write s, read to (N,784) s):")
        for name, r in layouts.items():
            print(f"  {name:62} {r['ratio']:6.3f} {r['write_s']:7.2f} {r['read_s']:7.3f}")
    print(f"\nwrote {args.output} and {kept.relative_to(PROJECT_ROOT)}")
    return 0


def serving_main(args: argparse.Namespace) -> int:
    """``--serving``: both model servers on the same model and load; figures and ratios to results.json."""
    from prefect.testing.utilities import prefect_test_harness

    from bench.serving import bench_serving

    work = Path(tempfile.mkdtemp(prefix="train-mnist-bench-serving-"))
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(work / "prefect-storage")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    results: dict[str, Any] = {"command": "python bench/run.py --serving", "mode": "serving", "machine": machine()}
    try:
        with prefect_test_harness(server_startup_timeout=120):
            details = bench_serving(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results |= {k: details[k] for k in TARGETS if k in details} | {"details": {"serving": details}}
    results["targets_met"] = {m: verdict(m, results[m]) for m in TARGETS if m in results}
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    kept = keep_record("serving", results)
    print(table(results))
    for key, row in details.items():
        if isinstance(row, dict) and isinstance(row.get("rows_per_s"), float):
            print(f"{key:28} {row['requests_per_s']:9.1f} req/s {row['rows_per_s']:10.1f} rows/s "
                  f"p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  failures {row['failures']}")
    scrape = details["metrics_scrape"]
    print(f"/metrics read every {scrape['scrape_every_s']:g} s ({scrape['scrapes']} reads): batch-1 rows/s "
          f"{scrape['rows_per_s']['with']:.1f} with, {scrape['rows_per_s']['without']:.1f} without "
          f"(ratio {scrape['rows_per_s_ratio']:.3f}); p99 {scrape['p99_ms']['with']:.2f} / "
          f"{scrape['p99_ms']['without']:.2f} ms")
    print(f"swap: {details['swap']}")
    print(f"\nwrote {args.output} and {kept.relative_to(PROJECT_ROOT)}")
    return 0


def server_load_main(args: argparse.Namespace) -> int:
    """``--server-load``: the same concurrent load against a SQLite- and a PostgreSQL-backed Prefect server."""
    from bench.server_load import bench_server_load

    work = Path(tempfile.mkdtemp(prefix="train-mnist-bench-load-"))
    results: dict[str, Any] = {"command": "python bench/run.py --server-load", "mode": "server-load",
                               "machine": machine()}
    try:
        results["details"] = {"server_load": bench_server_load(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    kept = keep_record("server-load", results)
    print(f"{'database':12} {'created':>8} {'completed':>10} {'failed API calls':>17} {'lock errors':>12} "
          f"{'runs lost':>10} {'s to all final':>15}")
    for row in results["details"]["server_load"].values():
        print(f"{row['database']:12} {row['created']:8} {row['completed']:10} {row['failed_api_calls']:17} "
              f"{row['lock_errors']:12} {row['runs_lost']:10} {row['seconds_to_all_final']:15}")
    print(f"\nwrote {args.output} and {kept.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
