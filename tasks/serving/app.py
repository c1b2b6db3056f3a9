"""``train-mnist serve``: the production models over the Open Inference Protocol (KServe v2 REST).

    GET  /v2/health/live              the process answers
    GET  /v2/health/ready             every model asked for is loaded (503 until then)
    GET  /v2/models/{name}            metadata: input pixels [-1, 784], outputs, the version serving now
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer      {"inputs": [{"name": "pixels", "shape": [N, 784], "datatype": "UINT8",
                                                   "data": [...]}]}

Built on FastAPI and uvicorn, which Prefect already installs: KServe's model server (``kserve`` 0.21) and
MLServer (1.7) resolve beside Prefect here only by moving pandas, protobuf, FastAPI or ml-dtypes to other
versions than TensorFlow, Prefect and Great Expectations are tested with (and KServe adds the Kubernetes
client). The protocol is the same. Listens on 127.0.0.1 unless told otherwise; at most one log line per
request, at debug level.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from fastapi import FastAPI, Request  # FastAPI reads the route signatures' annotations by name, at module level
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tasks.serving.champion import POLL_SECONDS, Champion, follow
from tasks.serving.protocol import MAX_BATCH, InferenceError, infer_response, model_metadata, parse_infer_request

logger = logging.getLogger("train_mnist.serving")
DEFAULT_PORT = 8080


def create_app(champions: dict[str, Champion], class_names: dict[str, list[str]], max_batch: int = MAX_BATCH):
    """The FastAPI application serving ``champions`` (dataset name -> its production model)."""
    app = FastAPI(title="train-mnist model server", description="Open Inference Protocol (KServe v2 REST)")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def champion_of(name: str) -> Champion | JSONResponse:
        found = champions.get(name)
        return found if found is not None else error(404, f"no model named {name!r}; served: {sorted(champions)}")

    @app.get("/v2/health/live")
    def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        waiting = sorted(name for name, c in champions.items() if c.current is None)
        return {"ready": True} if not waiting else JSONResponse({"ready": False, "waiting_for": waiting}, 503)

    @app.get("/v2/models/{name}")
    def metadata(name: str):
        champion = champion_of(name)
        if isinstance(champion, JSONResponse):
            return champion
        current = champion.current
        return model_metadata(name, current.version if current else None, len(class_names[name]), champion.status())

    @app.get("/v2/models/{name}/ready")
    def model_ready(name: str):
        champion = champion_of(name)
        if isinstance(champion, JSONResponse):
            return champion
        ready = champion.current is not None
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        champion = champion_of(name)
        if isinstance(champion, JSONResponse):
            return champion
        served = champion.current  # read once: this request finishes on this version, whatever is swapped in
        if served is None:
            return error(503, f"{name}: no production model loaded yet")
        try:
            parsed = parse_infer_request(await request.body(), max_batch)
        except InferenceError as exc:
            logger.debug("%s infer refused (%d): %s", name, exc.status, exc)
            return error(exc.status, str(exc))
        probabilities = await run_in_threadpool(served.forward, parsed.pixels)
        logger.debug("%s infer: %d rows, version %s", name, len(parsed.pixels), served.version)
        return infer_response(name, served.version, probabilities, class_names[name], parsed.request_id)

    return app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train-mnist serve", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="whose production models to serve: a name, or several "
                        "separated by commas (each is a model of the server, named after its dataset)")
    parser.add_argument("--registry", help="a folder or an MLflow URL (default <data-dir>/registry; env "
                        "TRAIN_MNIST_REGISTRY)")
    parser.add_argument("--datasets-file", help="TOML file with more dataset definitions")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS,
                        help=f"how often to look for a new production version (default {POLL_SECONDS:g})")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help=f"rows per request (default {MAX_BATCH})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from tasks.datasets import DatasetConfigError, load_catalog, select_datasets
    from tasks.model_io import import_keras
    from tasks.registry import open_registry
    from tasks.settings import Settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        specs = select_datasets(load_catalog(args.datasets_file), [n.strip() for n in args.dataset.split(",")])
    except DatasetConfigError as exc:
        print(f"train-mnist serve: {exc}", file=sys.stderr)
        return 2
    import_keras()
    registry = open_registry(args.registry or Settings().registry_location)
    champions = {spec.name: Champion(spec.name, registry) for spec in specs}
    for champion in champions.values():
        champion.refresh()
        if champion.current is None:
            logger.warning("%s: nothing to serve yet (%s); waiting for a production version", champion.dataset,
                           champion.refused or f"no production version in {registry.location}")
    stop = threading.Event()
    follow(list(champions.values()), args.poll_seconds, stop)
    app = create_app(champions, {spec.name: list(spec.class_names) for spec in specs}, args.max_batch)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
