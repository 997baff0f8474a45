"""The Open Inference Protocol v2 (KServe / Triton REST) wire format: reading an inference
request (JSON tensors, or the binary tensor extension: a JSON header of
``Inference-Header-Content-Length`` bytes followed by the tensors' raw bytes) and writing
its response, and the server's and model's metadata documents.

Pure functions on bytes and numpy: no HTTP, no Twisted. The routes are in v2.py.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from batchserve.errors import InvalidInput
from batchserve.http.bodies import RequestLimits, check_count, check_keys
from batchserve.models.batches import Prediction
from batchserve.models.spec import ModelInfo
from batchserve.storage.records import parse_json

VERSION = "1"
#: What the server metadata gives as its version: the protocol's.
PROTOCOL_VERSION = "2"
IMAGE, PIXELS = "IMAGE", "PIXELS"
EMBEDDING, PROBABILITIES = "EMBEDDING", "PROBABILITIES"
#: The request parameter (Triton's) that carries a deadline, in microseconds.
TIMEOUT_US = "timeout"

#: The fields the protocol defines for an inference request, each of its inputs, and each
#: output it asks for (what tritonclient sends is among them); any other is refused.
REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OUTPUT_KEYS = frozenset({"name", "parameters"})

Image = bytes | npt.NDArray[np.uint8]


@dataclass(frozen=True)
class InferRequest:
    """What an inference request asks: its images (encoded bytes or decoded pixels), which
    outputs (name -> in binary), its id, and its own deadline."""

    images: list[Image]
    outputs: dict[str, bool]
    id: str | None = None
    timeout_s: float | None = None


def server_metadata() -> dict[str, Any]:
    """The protocol's server metadata. Its version is the protocol's, not the software's
    (which would tell an unauthenticated caller which known flaws to try; it is in the
    start-up log)."""
    return {"name": "batchserve", "version": PROTOCOL_VERSION, "extensions": ["binary_tensor_data"]}


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    height, width = info.input_size
    outputs = [{"name": EMBEDDING, "datatype": "FP32", "shape": [-1, info.dim]}]
    if info.classes:
        classes = len(info.classes)
        outputs.append({"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]})
    return {
        "name": info.name,
        "versions": [VERSION],
        "platform": f"batchserve_{info.backend}",
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "UINT8", "shape": [-1, height, width, 3]},
        ],
        "outputs": outputs,
        "parameters": {"classes": info.classes or [], "trained_on": info.trained_on},
    }


def read_infer(
    body: bytes, header_length: int | None, info: ModelInfo, limits: RequestLimits
) -> InferRequest:
    """Read an inference request for ``info``'s model: one input, IMAGE or PIXELS."""
    header, tail = _split(body, header_length)
    doc = parse_json(header)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInput("an inference request is a JSON object with a list of 'inputs'")
    check_keys(doc, REQUEST_KEYS, "the inference request")
    if len(doc["inputs"]) != 1:
        raise InvalidInput(f"send one input, {IMAGE} or {PIXELS}; got {len(doc['inputs'])}")
    images = _read_input(doc["inputs"][0], tail, limits)
    parameters = _parameters(doc, "parameters")
    return InferRequest(
        images=images,
        outputs=_outputs(doc.get("outputs", _ALL), parameters, info),
        id=_request_id(doc),
        timeout_s=_timeout_s(parameters.get(TIMEOUT_US)),
    )


def _request_id(doc: dict[str, Any]) -> str | None:
    if "id" not in doc:
        return None
    if not isinstance(doc["id"], str):
        raise InvalidInput("id must be a string")
    return doc["id"]


def _split(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not 0 < header_length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {header_length} does not fit a body of "
            f"{len(body)} bytes"
        )
    return body[:header_length], body[header_length:]


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    """``holder``'s "parameters": absent is none, anything but an object (null too) is
    refused."""
    return _object(holder["parameters"], what) if "parameters" in holder else {}


def _read_input(tensor: object, tail: bytes, limits: RequestLimits) -> list[Image]:
    if not isinstance(tensor, dict):
        raise InvalidInput("an input must be a JSON object")
    check_keys(tensor, INPUT_KEYS, "an input")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    # type(), not isinstance(): a bool is an int, and not a dimension.
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise InvalidInput(f"input {name}: shape must be a list of non-negative integers")
    if shape:
        check_count(shape[0], "images", limits)
    _check_elements(name, shape, limits)
    size = _parameters(tensor, "input parameters").get("binary_data_size")
    raw = _binary(tail, size, name) if size is not None else None
    if name == IMAGE and datatype == "BYTES":
        return _images(tensor.get("data"), raw, shape)
    if name == PIXELS and datatype == "UINT8":
        return _pixels(tensor.get("data"), raw, shape)
    raise InvalidInput(
        f"unknown input {name} ({datatype}): send {IMAGE} (BYTES, [N], encoded images) or "
        f"{PIXELS} (UINT8, [N, H, W, 3])"
    )


def _check_elements(name: object, shape: list[int], limits: RequestLimits) -> None:
    """Refuse a shape of more elements than a body within the limit can carry (each takes
    at least a byte). Multiplied in Python's integers (no int64 to overflow), stopping once
    past the limit (a product of a million dimensions is never formed)."""
    elements = 0 if 0 in shape else 1
    for n in shape:
        elements *= n
        if elements > limits.max_body_bytes:
            raise InvalidInput(
                f"input {name}: shape {_short(shape)} holds over {limits.max_body_bytes} "
                f"elements, the most a request may carry (a byte each, in a body of at most "
                f"{limits.max_body_bytes} bytes)"
            )


def _short(shape: list[int]) -> str:
    """``shape`` for a message: its first 8 dimensions (a shape may hold millions)."""
    return f"[{', '.join(map(str, shape[:8]))}{', ...' if len(shape) > 8 else ''}]"


def _binary(tail: bytes, size: object, name: object) -> bytes:
    if not isinstance(size, int) or size < 0 or size != len(tail):
        raise InvalidInput(
            f"input {name}: binary_data_size {size} does not match the {len(tail)} bytes "
            "after the header"
        )
    return tail


def _images(data: object, raw: bytes | None, shape: list[int]) -> list[Image]:
    """IMAGE: JSON base64 strings, or binary elements of a 4-byte little-endian length and
    the bytes."""
    if len(shape) != 1:
        raise InvalidInput(f"input {IMAGE}: shape must be [N], not {_short(shape)}")
    images: list[Image] = list(_unpack_bytes(raw)) if raw is not None else _base64_list(data)
    if len(images) != shape[0] or not images:
        raise InvalidInput(f"input {IMAGE}: shape {shape} but {len(images)} elements")
    return images


def _unpack_bytes(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidInput(f"input {IMAGE}: a truncated element length")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise InvalidInput(f"input {IMAGE}: element {len(out)} runs past the data")
        out.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    return out


def _base64_list(data: object) -> list[Image]:
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise InvalidInput(f"input {IMAGE}: data must be a list of base64 strings")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"input {IMAGE}: data is not base64: {e}") from e


def _pixels(data: object, raw: bytes | None, shape: list[int]) -> list[Image]:
    if len(shape) != 4 or shape[3] != 3 or 0 in shape:
        raise InvalidInput(f"input {PIXELS}: shape must be [N, H, W, 3], not {_short(shape)}")
    array = np.frombuffer(raw, dtype=np.uint8) if raw is not None else _uint8_list(data)
    if array.size != math.prod(shape):
        raise InvalidInput(f"input {PIXELS}: shape {shape} but {array.size} values")
    return list(array.reshape(shape))


def _uint8_list(data: object) -> npt.NDArray[np.uint8]:
    """UINT8 data: JSON integers 0-255 in a flat or nested list (row-major). Anything else
    (a string, a float, a boolean, null) is refused, not converted."""
    refused = InvalidInput(f"input {PIXELS}: data must be a list of integers 0-255")
    if not isinstance(data, list):
        raise refused
    values: list[Any] = data
    # The types of each level at C speed (0.2 s for 8 M values, a generator over them
    # twice that); type(), not isinstance(): a bool is an int, and not a pixel value.
    kinds = set(map(type, values))
    while list in kinds:  # nested, [N][H][W][3]: flattened a level at a time
        if kinds != {list}:
            raise InvalidInput(f"input {PIXELS}: data nests its lists unevenly")
        values = list(chain.from_iterable(values))
        kinds = set(map(type, values))
    if not kinds <= {int}:
        raise refused
    if values and (min(values) < 0 or max(values) > 255):
        raise refused
    return np.array(values, dtype=np.uint8)


#: No "outputs" in a request: every output the model has.
_ALL = object()


def _outputs(requested: object, parameters: dict[str, Any], info: ModelInfo) -> dict[str, bool]:
    """Output name -> sent in binary. None asked: every output the model has."""
    default_binary = bool(parameters.get("binary_data_output", False))
    known = [EMBEDDING] + ([PROBABILITIES] if info.classes else [])
    if requested is _ALL:
        return dict.fromkeys(known, default_binary)
    if not isinstance(requested, list) or not requested:
        raise InvalidInput("outputs must be a non-empty list")
    chosen: dict[str, bool] = {}
    for output in requested:
        output = _object(output, "an output")
        check_keys(output, OUTPUT_KEYS, "an output")
        if output.get("name") not in known:
            raise InvalidInput(f"unknown output {output.get('name')}; this model has {known}")
        wanted = _parameters(output, "output parameters")
        chosen[output["name"]] = bool(wanted.get("binary_data", default_binary))
    return chosen


def _timeout_s(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput("parameter timeout must be a positive number of microseconds")
    return value / 1e6


def write_infer(
    info: ModelInfo, request: InferRequest, predictions: list[Prediction]
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when tensors follow in binary."""
    tails: list[bytes] = []
    outputs = []
    for name, binary in request.outputs.items():
        tensor = _tensor(name, predictions)
        doc: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(tensor.shape)}
        if binary:
            raw = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
            doc["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            doc["data"] = tensor.ravel()
        outputs.append(doc)
    response: dict[str, Any] = {"model_name": info.name, "model_version": VERSION}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tails:
        return header, None
    return header + b"".join(tails), len(header)


def _tensor(name: str, predictions: list[Prediction]) -> npt.NDArray[np.float32]:
    if name == EMBEDDING:
        return np.stack([p.embedding for p in predictions]).astype(np.float32)
    rows = [p.probabilities for p in predictions]
    return np.stack([r for r in rows if r is not None]).astype(np.float32)
