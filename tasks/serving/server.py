"""``train-mnist serve``'s command line: the models, their watchers, the drift monitors and the sampler, wired
to the application (``tasks.serving.app``) and run by uvicorn until Ctrl-C.

    train-mnist serve --dataset mnist[,fashion-mnist] [--registry FOLDER|URL] [--port 8080]
                      [--drift-window 2000] [--drift-hold-seconds 60] [--alert-webhook URL]
                      [--sample-rate 0.01 --sample-dir DIR [--sample-max-mb 256]]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from tasks.serving.champion import POLL_SECONDS, Champion, Served, follow
from tasks.serving.limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_CONNECTIONS, Limits, guarded_protocol
from tasks.serving.monitor import HOLD_S, MIN_ROWS, WINDOW_ROWS, DriftMonitor, DriftSettings, watch
from tasks.serving.protocol import MAX_BATCH
from tasks.serving.sampling import PredictionSampler

DEFAULT_PORT = 8080
WEBHOOK_ENV = "TRAIN_MNIST_ALERT_WEBHOOK"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train-mnist serve", description="Serve the production models over the "
                                     "Open Inference Protocol (KServe v2 REST), with /metrics")
    parser.add_argument("--dataset", required=True, help="whose production models to serve: a name, or several "
                        "separated by commas (each is a model of the server, named after its dataset)")
    parser.add_argument("--registry", help="a folder or an MLflow URL (default <data-dir>/registry; env "
                        "TRAIN_MNIST_REGISTRY)")
    parser.add_argument("--datasets-file", help="TOML file with more dataset definitions")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS,
                        help=f"how often to look for a new production version (default {POLL_SECONDS:g})")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help=f"rows per request (default {MAX_BATCH}); the largest body read follows from it")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                        help=f"seconds a request's head may take to arrive (default {HEADER_TIMEOUT_S:g})")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                        help=f"seconds a request's body may take to arrive (default {BODY_TIMEOUT_S:g})")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help=f"open connections at once; more are answered 503 (default {MAX_CONNECTIONS})")
    drift = parser.add_argument_group("live drift (README: Watching the live model)")
    drift.add_argument("--drift-window", type=positive_int, default=WINDOW_ROWS,
                       help=f"rows kept per model and scored against its training profile (default {WINDOW_ROWS})")
    drift.add_argument("--drift-hold-seconds", type=float, default=HOLD_S,
                       help=f"how long a score must stay above its threshold to count as drift (default {HOLD_S:g})")
    drift.add_argument("--alert-webhook", help=f"POST one alert per drift episode to this URL (env {WEBHOOK_ENV})")
    sampling = parser.add_argument_group("prediction sampling (off unless --sample-rate is given)")
    sampling.add_argument("--sample-rate", type=float, help="share of served rows to keep, with the answers (0..1]")
    sampling.add_argument("--sample-dir", type=Path, help="folder of the sampled rows' Parquet files")
    sampling.add_argument("--sample-max-mb", type=float, default=256,
                          help="the sample files' total size; the oldest go first (default 256)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)
    if (args.sample_rate is None) != (args.sample_dir is None):
        parser.error("--sample-rate and --sample-dir go together: how much to keep, and where")
    if args.sample_rate is not None and not 0 < args.sample_rate <= 1:
        parser.error(f"--sample-rate must be above 0 and at most 1, not {args.sample_rate}")
    if args.drift_hold_seconds < 0:
        parser.error(f"--drift-hold-seconds must be 0 or more, not {args.drift_hold_seconds}")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of rows, not {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from tasks.datasets import DatasetConfigError, load_catalog, select_datasets
    from tasks.model_io import import_keras
    from tasks.serving.app import create_app
    from tasks.serving.notices import drift_notice, follow_events
    from tasks.settings import Settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        specs = select_datasets(load_catalog(args.datasets_file), [n.strip() for n in args.dataset.split(",")])
    except DatasetConfigError as exc:
        print(f"train-mnist serve: {exc}", file=sys.stderr)
        return 2
    # The server retries the registry itself, with a backoff; MLflow's client must not stall a try for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import_keras()
    location = args.registry or Settings().registry_location
    names = {spec.name: list(spec.class_names) for spec in specs}
    notice = drift_notice(args.alert_webhook or os.environ.get(WEBHOOK_ENV), f"http://{args.host}:{args.port}")
    settings = DriftSettings(window_rows=args.drift_window, min_rows=min(args.drift_window, MIN_ROWS),
                             hold_s=args.drift_hold_seconds)
    monitors = {spec.name: DriftMonitor(spec, settings, notice) for spec in specs}
    champions = {spec.name: Champion(spec.name, location, len(spec.class_names),
                                     on_swap=swapped_in(monitors[spec.name])) for spec in specs}
    sampler = (PredictionSampler(args.sample_dir, args.sample_rate, max_bytes=int(args.sample_max_mb * 2**20))
               if args.sample_rate else None)
    stop = threading.Event()
    follow(list(champions.values()), args.poll_seconds, stop)  # the first look at once, in the background
    follow_events(champions, stop)
    watch(list(monitors.values()), settings.interval_s, stop)
    writer = sampler.run(stop) if sampler else None
    limits = Limits(args.max_batch, args.header_timeout, args.body_timeout, args.max_connections)
    app = create_app(champions, names, limits, monitors, sampler)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                    http=guarded_protocol(limits), limit_concurrency=limits.max_connections)
    finally:
        stop.set()
        if writer is not None:
            sampler.wake()
            writer.join(timeout=30)  # the rows sampled since the last file
    return 0


def swapped_in(monitor: DriftMonitor):
    """A version swapped in: its drift window starts empty, against its own training profile (or, for a version
    published without one, the dataset's reference profile)."""
    def tell(served: Served) -> None:
        reference = monitor.spec.reference.profile if monitor.spec.reference else None
        monitor.serve(served.version, served.trained_on or reference)
    return tell


if __name__ == "__main__":
    sys.exit(main())
