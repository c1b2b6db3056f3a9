"""The Open Inference Protocol (KServe v2 REST) as train-mnist speaks it: requests checked like training rows.

An infer request holds one input, ``pixels``: shape ``[N, 784]`` (N rows of a 28x28 image, row-major),
``data`` flat in row-major order (or nested rows), integers 0..255, datatype an integer or float type of
the protocol. Anything else is refused with a 4xx naming the problem, never a 500 and never a prediction:
malformed JSON, a missing or extra input, a wrong shape or datatype, a value that is not an integer in
0..255, a batch of more than ``max_batch`` rows. The answer holds the class probabilities, the predicted
class index and its name, and names the model version that answered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.datasets import NUM_PIXELS, PIXEL_MAX, PIXEL_MIN

INPUT_NAME = "pixels"
INTEGER_TYPES = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
FLOAT_TYPES = ("FP16", "FP32", "FP64")
MAX_BATCH = 1024  # rows per request: a 1024-row request is 0.8 MB of pixels and ~4 MB of JSON


class InferenceError(ValueError):
    """A request the protocol or the data checks refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    pixels: np.ndarray  # (N, 784) uint8
    request_id: str | None


def parse_infer_request(body: bytes, max_batch: int = MAX_BATCH) -> InferRequest:
    """The rows of an infer request, checked; ``InferenceError`` naming the first problem otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceError(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise InferenceError('the request must be a JSON object with a list "inputs"')
    inputs = payload["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT_NAME:
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise InferenceError(f'expected exactly one input named "{INPUT_NAME}", got {names or inputs!r}')
    spec = inputs[0]
    datatype = spec.get("datatype")
    if datatype not in INTEGER_TYPES + FLOAT_TYPES:
        raise InferenceError(f"input {INPUT_NAME}: datatype {datatype!r} is not a numeric type of the protocol "
                             f"({', '.join(INTEGER_TYPES + FLOAT_TYPES)})")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool)
                                                                   for d in shape)):
        raise InferenceError(f"input {INPUT_NAME}: shape must be [rows, {NUM_PIXELS}], got {shape!r}")
    rows, columns = shape
    if columns != NUM_PIXELS or rows < 1:
        raise InferenceError(f"input {INPUT_NAME}: shape {shape}; expected [rows >= 1, {NUM_PIXELS}] "
                             f"(one row of {NUM_PIXELS} pixels per image)")
    if rows > max_batch:
        raise InferenceError(f"input {INPUT_NAME}: {rows} rows, more than the limit of {max_batch} per request; "
                             "split the batch", status=413)
    return InferRequest(pixels_of(spec.get("data"), rows), payload.get("id"))


def pixels_of(data: Any, rows: int) -> np.ndarray:
    """``data`` (flat or nested) as a (rows, 784) uint8 matrix, if every value is an integer 0..255."""
    if not isinstance(data, list):
        raise InferenceError(f"input {INPUT_NAME}: data must be a list of numbers")
    try:
        values = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise InferenceError(f"input {INPUT_NAME}: data holds values that are not numbers, or rows of "
                             "different lengths") from None
    if values.size != rows * NUM_PIXELS:
        raise InferenceError(f"input {INPUT_NAME}: {values.size} values for shape [{rows}, {NUM_PIXELS}] "
                             f"({rows * NUM_PIXELS} expected)")
    bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < PIXEL_MIN) | (values > PIXEL_MAX)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InferenceError(f"input {INPUT_NAME}: row {first // NUM_PIXELS + 1}, pixel {first % NUM_PIXELS + 1} is "
                             f"{values[first]:g}; pixels are integers {PIXEL_MIN}..{PIXEL_MAX}"
                             + (f" ({int(bad.sum())} such values)" if bad.sum() > 1 else ""))
    return values.astype(np.uint8).reshape(rows, NUM_PIXELS)


def infer_response(dataset: str, version: str, probabilities: np.ndarray, class_names: list[str],
                   request_id: str | None) -> dict[str, Any]:
    """The protocol's answer: probabilities, predicted class indices and names, and the version that answered."""
    predicted = probabilities.argmax(axis=1)
    rows, classes = probabilities.shape
    return {"model_name": dataset, "model_version": version, **({"id": request_id} if request_id else {}),
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [rows, classes],
                 "data": [round(float(p), 7) for p in probabilities.reshape(-1)]},
                {"name": "class", "datatype": "INT64", "shape": [rows], "data": predicted.tolist()},
                {"name": "label", "datatype": "BYTES", "shape": [rows], "data": [class_names[i] for i in predicted]},
            ]}


def model_metadata(dataset: str, version: str | None, classes: int, extra: dict[str, Any]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs, outputs and the version serving now (with where it came from)."""
    return {"name": dataset, "versions": [version] if version else [], "platform": "keras_tensorflow",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, NUM_PIXELS]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "class", "datatype": "INT64", "shape": [-1]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"version": version, **extra}}

