"""The Open Inference Protocol (KServe v2 REST) as train-mnist speaks it: requests checked like training rows.

An infer request holds one input, ``pixels``: shape ``[N, 784]`` (N rows of a 28x28 image, row-major).
In JSON, ``data`` is flat in row-major order (or one list per row) and holds JSON integers 0..255 only; the
datatype is ``UINT8``, or another integer type of the protocol (``UINT16`` ... ``INT64``) whose values are all
0..255. With the binary tensor data extension (header ``Inference-Header-Content-Length``, the input's
``binary_data_size``), the bytes after the JSON header are the tensor, little-endian, of that datatype.
Anything else is refused with a 4xx naming the input, the position and the value, never a 500 and never a
prediction: malformed or too deeply nested JSON, a missing or extra input, a wrong shape or datatype, a
float, a string, a boolean, a value outside 0..255, a batch of more than ``max_batch`` rows. The answer holds
the class probabilities, the predicted class index and its name (all, or the ``outputs`` asked for), each in
JSON or, when asked (``binary_data_output`` or an output's ``binary_data``), as binary tensor data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from tasks.datasets import NUM_PIXELS, PIXEL_MAX, PIXEL_MIN

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("probabilities", "class", "label")
# Integer datatypes of the protocol and their little-endian layout in binary tensor data.
INTEGER_TYPES = {"UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
                 "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8"}
MAX_BATCH = 1024  # rows per request: a 1024-row request is 0.8 MB of pixels and ~4 MB of JSON
HEADER_LENGTH = "inference-header-content-length"


class InferenceError(ValueError):
    """A request the protocol or the data checks refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    pixels: np.ndarray  # (N, 784) uint8
    request_id: str | None
    outputs: tuple[str, ...] = OUTPUT_NAMES  # what to answer with, in this order
    binary: frozenset[str] = field(default_factory=frozenset)  # outputs to send as binary tensor data


def max_body_bytes(max_batch: int) -> int:
    """The largest request body a server with ``max_batch`` rows per request reads: the JSON of a full batch
    (at most ``"255, "`` per pixel) or its binary form in the widest integer type, plus room for the rest."""
    return max_batch * NUM_PIXELS * 8 + 64 * 1024


def parse_infer_request(body: bytes, max_batch: int = MAX_BATCH, header_length: str | None = None) -> InferRequest:
    """The rows of an infer request, checked; ``InferenceError`` naming the first problem otherwise.
    ``header_length``: the ``Inference-Header-Content-Length`` header, when the body carries binary tensors."""
    header, binary = split_binary(body, header_length)
    payload = json_payload(header)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise InferenceError('the request must be a JSON object with a list "inputs"')
    inputs = payload["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT_NAME:
        names = [i.get("name") for i in inputs if isinstance(i, dict)]
        raise InferenceError(f'expected exactly one input named "{INPUT_NAME}", got {names or inputs!r}')
    spec = inputs[0]
    datatype = spec.get("datatype")
    if datatype not in INTEGER_TYPES:
        raise InferenceError(f"input {INPUT_NAME}: datatype {datatype!r} is not accepted: pixels are integers "
                             f"{PIXEL_MIN}..{PIXEL_MAX}, datatype UINT8 (or {', '.join(list(INTEGER_TYPES)[1:])} "
                             "holding values 0..255)")
    rows = checked_rows(spec.get("shape"), max_batch)
    size = (spec.get("parameters") or {}).get("binary_data_size") if isinstance(spec.get("parameters"), dict) else None
    if size is not None:
        pixels = binary_pixels(binary, size, datatype, rows)
    elif binary:
        raise InferenceError(f"{len(binary)} bytes of binary data follow the JSON header, but input "
                             f"{INPUT_NAME} has no binary_data_size")
    else:
        pixels = json_pixels(spec.get("data"), rows)
    outputs, wanted_binary = requested_outputs(payload)
    request_id = payload.get("id")
    return InferRequest(pixels, request_id if isinstance(request_id, str) else None, outputs, wanted_binary)


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a body; all JSON when there is no ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise InferenceError(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
    if not 0 < length <= len(body):
        raise InferenceError(f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes")
    return body[:length], body[length:]


def json_payload(header: bytes) -> Any:
    try:
        return json.loads(header)
    except RecursionError:
        raise InferenceError("malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceError(f"malformed JSON: {exc}") from None


def checked_rows(shape: Any, max_batch: int) -> int:
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)):
        raise InferenceError(f"input {INPUT_NAME}: shape must be [rows, {NUM_PIXELS}], got {shape!r}")
    rows, columns = shape
    if columns != NUM_PIXELS or rows < 1:
        raise InferenceError(f"input {INPUT_NAME}: shape {shape}; expected [rows >= 1, {NUM_PIXELS}] "
                             f"(one row of {NUM_PIXELS} pixels per image)")
    if rows > max_batch:
        raise InferenceError(f"input {INPUT_NAME}: {rows} rows, more than the limit of {max_batch} per request; "
                             "split the batch", status=413)
    return rows


def position(index: int) -> str:
    return f"row {index // NUM_PIXELS + 1}, pixel {index % NUM_PIXELS + 1}"


def json_pixels(data: Any, rows: int) -> np.ndarray:
    """``data`` (flat, or one list per row) as a (rows, 784) uint8 matrix, if every value is a JSON integer 0..255."""
    if not isinstance(data, list):
        raise InferenceError(f"input {INPUT_NAME}: data must be a list of integers")
    if data and all(type(row) is list for row in data):
        short = next((i for i, row in enumerate(data) if len(row) != NUM_PIXELS), None)
        if short is not None or len(data) != rows:
            which = f"row {short + 1} has {len(data[short])} values" if short is not None else f"{len(data)} rows"
            raise InferenceError(f"input {INPUT_NAME}: {which}; shape [{rows}, {NUM_PIXELS}] takes {rows} rows of "
                                 f"{NUM_PIXELS}")
        flat = list(chain.from_iterable(data))
    else:
        flat = data
    if len(flat) != rows * NUM_PIXELS:
        raise InferenceError(f"input {INPUT_NAME}: {len(flat)} values for shape [{rows}, {NUM_PIXELS}] "
                             f"({rows * NUM_PIXELS} expected, flat or as rows of {NUM_PIXELS})")
    if set(map(type, flat)) != {int}:  # bool is a subclass of int: compare types, not isinstance
        index = next(i for i, value in enumerate(flat) if type(value) is not int)
        raise InferenceError(f"input {INPUT_NAME}: {position(index)} is {json.dumps(flat[index])[:40]}; pixels are "
                             f"JSON integers {PIXEL_MIN}..{PIXEL_MAX}")
    try:
        values = np.asarray(flat, dtype=np.int64)
    except OverflowError:
        index = next(i for i, value in enumerate(flat) if not PIXEL_MIN <= value <= PIXEL_MAX)
        raise InferenceError(f"input {INPUT_NAME}: {position(index)} is {flat[index]}; pixels are integers "
                             f"{PIXEL_MIN}..{PIXEL_MAX}") from None
    return in_pixel_range(values, rows)


def binary_pixels(binary: bytes, size: Any, datatype: str, rows: int) -> np.ndarray:
    """The input's binary tensor data (little-endian ``datatype``) as a (rows, 784) uint8 matrix, checked."""
    dtype = np.dtype(INTEGER_TYPES[datatype])
    expected = rows * NUM_PIXELS * dtype.itemsize
    if type(size) is not int or size != expected or len(binary) < size:
        raise InferenceError(f"input {INPUT_NAME}: binary_data_size {size!r} with {len(binary)} bytes of binary "
                             f"data; shape [{rows}, {NUM_PIXELS}] of {datatype} takes {expected} bytes")
    if len(binary) > size:
        raise InferenceError(f"{len(binary) - size} bytes of binary data follow the last input")
    return in_pixel_range(np.frombuffer(binary, dtype=dtype, count=rows * NUM_PIXELS).astype(np.int64), rows)


def in_pixel_range(values: np.ndarray, rows: int) -> np.ndarray:
    bad = (values < PIXEL_MIN) | (values > PIXEL_MAX)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InferenceError(f"input {INPUT_NAME}: {position(first)} is {values[first]}; pixels are integers "
                             f"{PIXEL_MIN}..{PIXEL_MAX}" + (f" ({int(bad.sum())} such values)" if bad.sum() > 1 else ""))
    return values.astype(np.uint8).reshape(rows, NUM_PIXELS)


def requested_outputs(payload: dict) -> tuple[tuple[str, ...], frozenset[str]]:
    """Which outputs to answer with (all when none are named) and which of them as binary tensor data."""
    parameters = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    all_binary = parameters.get("binary_data_output") is True
    asked = payload.get("outputs")
    if asked is None:
        return OUTPUT_NAMES, frozenset(OUTPUT_NAMES) if all_binary else frozenset()
    if not isinstance(asked, list) or not all(isinstance(o, dict) and o.get("name") in OUTPUT_NAMES for o in asked):
        names = [o.get("name") if isinstance(o, dict) else o for o in asked] if isinstance(asked, list) else asked
        raise InferenceError(f"outputs {names!r}: this model's outputs are {', '.join(OUTPUT_NAMES)}")
    binary = {o["name"] for o in asked
              if (o.get("parameters") or {}).get("binary_data", all_binary) is True}
    return tuple(o["name"] for o in asked), frozenset(binary)


def output_tensors(probabilities: np.ndarray, class_names: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """Every output as (datatype, array): probabilities (FP32), the predicted class (INT64) and its name (BYTES)."""
    predicted = probabilities.argmax(axis=1)
    return {"probabilities": ("FP32", probabilities.astype(np.float32)),
            "class": ("INT64", predicted.astype(np.int64)),
            "label": ("BYTES", np.array([class_names[i] for i in predicted], dtype=object))}


def encode_binary(datatype: str, array: np.ndarray) -> bytes:
    """A tensor as the binary extension lays it out: little-endian values; BYTES as 4-byte length + bytes each."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (str(v).encode() for v in array.reshape(-1)))
    return np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<")).tobytes()


def infer_response(dataset: str, version: str, probabilities: np.ndarray, class_names: list[str],
                   request: InferRequest) -> tuple[dict[str, Any], bytes]:
    """The protocol's answer (its JSON, and the binary tensor data that follows it, if any was asked for):
    the outputs asked for, and the version that answered."""
    rows, classes = probabilities.shape
    if classes != len(class_names):
        raise InferenceError(f"{dataset} {version} answers with {classes} classes, but {dataset} has "
                             f"{len(class_names)} class names; this version cannot be served", status=503)
    tensors = output_tensors(probabilities, class_names)
    outputs, blobs = [], []
    for name in request.outputs:
        datatype, array = tensors[name]
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary:
            blob = encode_binary(datatype, array)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        elif datatype == "FP32":
            entry["data"] = [round(float(p), 7) for p in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    answer = {"model_name": dataset, "model_version": version,
              **({"id": request.request_id} if request.request_id else {}), "outputs": outputs}
    return answer, b"".join(blobs)


def model_metadata(dataset: str, version: str | None, classes: int, extra: dict[str, Any]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs, outputs and the version serving now (with where it came from)."""
    return {"name": dataset, "versions": [version] if version else [], "platform": "keras_tensorflow",
            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, NUM_PIXELS]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "class", "datatype": "INT64", "shape": [-1]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"version": version, **extra}}
