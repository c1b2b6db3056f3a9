"""``train-mnist serve``: the production models over the Open Inference Protocol (KServe v2 REST).

    GET  /v2                                          server metadata: name, version, extensions
    GET  /v2/health/live                              the process answers
    GET  /v2/health/ready                             every model asked for is loaded (503 naming why not)
    GET  /v2/models/{name}[/versions/{version}]       metadata: input pixels [-1, 784], outputs, the version
    GET  /v2/models/{name}[/versions/{version}]/ready
    POST /v2/models/{name}[/versions/{version}]/infer {"inputs": [{"name": "pixels", "shape": [N, 784],
                                                                    "datatype": "UINT8", "data": [...]}]}

A versioned path answers for the version being served and 404 (naming it) for any other. Requests may use
the binary tensor data extension and ``Content-Encoding: gzip``. Every error is ``{"error": "..."}`` with a
4xx (or 503 while a model is not loaded), never a 500 with a traceback. Built on FastAPI and uvicorn, which
Prefect already installs: KServe's model server (``kserve`` 0.21) and MLServer (1.7) resolve beside Prefect
here only by moving pandas, protobuf, FastAPI or ml-dtypes to other versions than TensorFlow, Prefect and
Great Expectations are tested with. Listens on 127.0.0.1 unless told otherwise; limits in
``tasks.serving.limits``; at most one log line per request, at debug level.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import zlib
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request  # FastAPI reads the route signatures' annotations by name, at module level
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tasks.serving.champion import POLL_SECONDS, Champion, follow
from tasks.serving.limits import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    Limits,
    guarded_protocol,
)
from tasks.serving.protocol import (
    HEADER_LENGTH,
    MAX_BATCH,
    InferenceError,
    infer_response,
    model_metadata,
    parse_infer_request,
)

logger = logging.getLogger("train_mnist.serving")
DEFAULT_PORT = 8080
SERVER_NAME = "train-mnist"
EXTENSIONS = ["binary_tensor_data"]


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def server_version() -> str:
    try:
        return version("train-mnist")
    except PackageNotFoundError:
        return "unknown"


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, at most ``limits.max_body_bytes`` (refused from ``Content-Length`` before it is read,
    or while it streams in), gunzipped if it says so (and then held to the same limit)."""
    limit = limits.max_body_bytes
    too_large = (f"request body over the limit of {limit} bytes ({limits.max_batch} rows per request; "
                 "split the batch)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InferenceError(too_large, status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InferenceError(too_large, status=413)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return bytes(body)
    if encoding != "gzip":
        raise InferenceError(f"Content-Encoding {encoding!r} is not supported (gzip or none)", status=415)
    inflate = zlib.decompressobj(wbits=31)
    try:
        plain = inflate.decompress(bytes(body), limit + 1)
    except zlib.error as exc:
        raise InferenceError(f"the gzip-encoded body does not decompress: {exc}") from None
    if len(plain) > limit or inflate.unconsumed_tail:
        raise InferenceError(too_large + " once decompressed", status=413)
    return plain


def create_app(champions: dict[str, Champion], class_names: dict[str, list[str]], limits: Limits | None = None):
    """The FastAPI application serving ``champions`` (dataset name -> its production model)."""
    limits = limits or Limits()
    app = FastAPI(title="train-mnist model server", description="Open Inference Protocol (KServe v2 REST)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error(exc.status_code, message + ("" if exc.status_code != 404 else "; the paths are under /v2"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, f"{request.method} {request.url.path}: {exc.errors()[:1]}")

    def champion_of(name: str, version: str | None = None) -> Champion | JSONResponse:
        found = champions.get(name)
        if found is None:
            return error(404, f"no model named {name!r}; served: {sorted(champions)}")
        served = found.current.version if found.current else None
        if version is not None and version != served:
            return error(404, f"{name}: version {version!r} is not served here; the version served now is "
                              f"{served or 'none (not loaded yet)'}")
        return found

    @app.get("/v2")
    def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        waiting = {name: c.waiting_reason() for name, c in sorted(champions.items()) if c.current is None}
        return {"ready": True} if not waiting else JSONResponse(
            {"ready": False, "waiting_for": sorted(waiting), "reasons": waiting,
             "error": "; ".join(f"{name}: {why}" for name, why in waiting.items())}, 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    def metadata(name: str, version: str | None = None):
        champion = champion_of(name, version)
        if isinstance(champion, JSONResponse):
            return champion
        current = champion.current
        return model_metadata(name, current.version if current else None, len(class_names[name]), champion.status())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    def model_ready(name: str, version: str | None = None):
        champion = champion_of(name, version)
        if isinstance(champion, JSONResponse):
            return champion
        ready = champion.current is not None
        return JSONResponse({"name": name, "ready": ready, **({} if ready else {"error": champion.waiting_reason()})},
                            status_code=200 if ready else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        champion = champion_of(name, version)
        if isinstance(champion, JSONResponse):
            return champion
        served = champion.current  # read once: this request finishes on this version, whatever is swapped in
        if served is None:
            return error(503, f"{name}: no production model loaded yet ({champion.waiting_reason()})")
        try:
            body = await read_body(request, limits)
            # Parsing a large body takes CPU: off the event loop, so health checks and other requests go on.
            parsed = await run_in_threadpool(parse_infer_request, body, limits.max_batch,
                                             request.headers.get(HEADER_LENGTH))
            probabilities = await run_in_threadpool(served.forward, parsed.pixels)
            answer, binary = infer_response(name, served.version, probabilities, class_names[name], parsed)
        except ClientDisconnect:
            logger.debug("%s infer: the client went away before its request arrived whole", name)
            return Response(status_code=499)
        except InferenceError as exc:
            logger.debug("%s infer refused (%d): %s", name, exc.status, exc)
            # Connection: close: a refused body may still be arriving; the client must not send the next on it.
            return error(exc.status, str(exc), Connection="close")
        logger.debug("%s infer: %d rows, version %s", name, len(parsed.pixels), served.version)
        if not binary:
            return answer
        header = JSONResponse(answer).body
        return Response(header + binary, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})

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
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH,
                        help=f"rows per request (default {MAX_BATCH}); the largest body read follows from it")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                        help=f"seconds a request's head may take to arrive (default {HEADER_TIMEOUT_S:g})")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                        help=f"seconds a request's body may take to arrive (default {BODY_TIMEOUT_S:g})")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                        help=f"open connections at once; more are answered 503 (default {MAX_CONNECTIONS})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from tasks.datasets import DatasetConfigError, load_catalog, select_datasets
    from tasks.model_io import import_keras
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
    champions = {name: Champion(name, location, len(classes)) for name, classes in names.items()}
    stop = threading.Event()
    follow(list(champions.values()), args.poll_seconds, stop)  # the first look at once, in the background
    limits = Limits(args.max_batch, args.header_timeout, args.body_timeout, args.max_connections)
    app = create_app(champions, names, limits)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                    http=guarded_protocol(limits), limit_concurrency=limits.max_connections)
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
