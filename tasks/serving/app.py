"""``train-mnist serve``: the production models over the Open Inference Protocol (KServe v2 REST).

    GET  /metrics                                     Prometheus metrics (``tasks.serving.metrics``)
    GET  /v2                                          server metadata: name, version, extensions
    GET  /v2/health/live                              the process answers
    GET  /v2/health/ready                             every model asked for is loaded (503 naming why not)
    GET  /v2/models/{name}[/versions/{version}]       metadata: input pixels [-1, 784], outputs, the version,
                                                      its live drift scores
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

import logging
import time
import zlib
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request  # FastAPI reads the route signatures' annotations by name, at module level
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tasks.serving.champion import Champion
from tasks.serving.limits import Limits
from tasks.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tasks.serving.metrics import ServerMetrics
from tasks.serving.monitor import DriftMonitor
from tasks.serving.protocol import (
    HEADER_LENGTH,
    InferenceError,
    infer_response,
    model_metadata,
    parse_infer_request,
)
from tasks.serving.sampling import PredictionSampler

logger = logging.getLogger("train_mnist.serving")
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


def create_app(champions: dict[str, Champion], class_names: dict[str, list[str]], limits: Limits | None = None,
               monitors: dict[str, DriftMonitor] | None = None, sampler: PredictionSampler | None = None):
    """The FastAPI application serving ``champions`` (dataset name -> its production model), with each model's
    drift monitor and the optional prediction sampler fed from the request path."""
    limits = limits or Limits()
    monitors = monitors or {}
    metrics = ServerMetrics(champions, monitors, class_names)
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

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

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
        status = champion.status() | ({"drift": monitors[name].status()} if name in monitors else {})
        return model_metadata(name, current.version if current else None, len(class_names[name]), status)

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
        started = time.perf_counter()
        if name not in champions:  # not counted: an unknown name would be a label anyone could add
            return champion_of(name)
        champion = champions[name]
        served = champion.current  # read once: this request finishes on this version, whatever is swapped in
        wrong_version = champion_of(name, version) if version is not None else None
        response = (wrong_version if isinstance(wrong_version, JSONResponse)
                    else await answer(name, served, champion, request))
        metrics.answered(name, served.version if served else None, response.status_code,
                         time.perf_counter() - started)
        return response

    async def answer(name: str, served, champion: Champion, request: Request) -> Response:
        if served is None:
            return error(503, f"{name}: no production model loaded yet ({champion.waiting_reason()})")
        try:
            body = await read_body(request, limits)
            # Parsing a large body takes CPU: off the event loop, so health checks and other requests go on.
            parsed = await run_in_threadpool(parse_infer_request, body, limits.max_batch,
                                             request.headers.get(HEADER_LENGTH))
            probabilities = await run_in_threadpool(served.forward, parsed.pixels)
            reply, binary = infer_response(name, served.version, probabilities, class_names[name], parsed)
        except ClientDisconnect:
            logger.debug("%s infer: the client went away before its request arrived whole", name)
            return Response(status_code=499)
        except InferenceError as exc:
            logger.debug("%s infer refused (%d): %s", name, exc.status, exc)
            # Connection: close: a refused body may still be arriving; the client must not send the next on it.
            return error(exc.status, str(exc), Connection="close")
        logger.debug("%s infer: %d rows, version %s", name, len(parsed.pixels), served.version)
        observe(name, served.version, parsed.pixels, probabilities)
        if not binary:
            return JSONResponse(reply)
        header = JSONResponse(reply).body
        return Response(header + binary, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})

    def observe(name: str, version: str, pixels, probabilities) -> None:
        """What the answer feeds: the class counts, the drift window and the sampled rows."""
        classes = probabilities.argmax(axis=1)
        metrics.predicted(name, version, classes)
        if name in monitors:
            monitors[name].observe(version, pixels, classes)
        if sampler is not None:
            sampler.observe(name, version, pixels, probabilities)

    return app
