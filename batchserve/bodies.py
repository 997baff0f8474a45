"""Reading images, items and options out of HTTP request bodies: raw bytes,
multipart/form-data, JSON with base64.

Pure functions of (content type, body); no Twisted, no Klein. The service runs them on the
decode pool, never on the reactor. Every failure is a domain error that api.py maps to a 4xx.
A body is bytes or a readable binary file (Twisted spools a large body to a temporary file);
multipart bodies are parsed as a stream, a megabyte at a time.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from batchserve.records import AddTask, SearchRequest, SearchTask
from batchserve.settings import setting

#: Multipart fields read as images when a part has no filename.
IMAGE_FIELDS = frozenset({"image", "images", "image[]", "images[]", "file", "files"})

_RAW_TYPES = frozenset({"application/octet-stream"})

MAX_ID_CHARS = 256
MAX_LABEL_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024
DEFAULT_K = 10
MAX_K = 1000

#: Bytes handed to the multipart parser at a time.
_CHUNK_BYTES = 1 << 20

#: A request body as the HTTP layer holds it.
BodySource = bytes | IO[bytes]


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits, in bytes and counts."""

    max_body_bytes: int = setting(32 * 1024 * 1024, "largest request body in bytes", at_least=1)
    max_images: int = setting(
        64,
        "most images (or query vectors) in one request",
        name="max_images_per_request",
        at_least=1,
    )


@dataclass
class Body:
    """What a request body holds: encoded images in order, multipart text fields, and the
    JSON document (for JSON bodies)."""

    images: list[bytes] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)
    doc: dict[str, Any] | None = None


def media_type(content_type: str | None) -> str:
    """The lower-cased media type of a Content-Type header, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def carries_images(content_type: str | None) -> bool:
    """Whether a body of this type can only be image work: raw image bytes or multipart
    (a JSON body may instead carry vectors, which never reach the model)."""
    kind = media_type(content_type)
    return kind.startswith("image/") or kind in _RAW_TYPES or kind == "multipart/form-data"


def _is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def _stream(body: BodySource) -> IO[bytes]:
    return BytesIO(body) if isinstance(body, bytes) else body


def parse_body(content_type: str | None, body: BodySource, limits: RequestLimits) -> Body:
    """Split a request body into images, fields and JSON, checking the limits.

    Raw body (``image/*`` or ``application/octet-stream``): one image. Multipart: every
    part with a filename, or named ``image``/``images``/``file``, is an image; other parts
    are text fields. JSON: ``{"images": [{"b64": "..."}, ...]}`` (a ``data:`` URL prefix is
    allowed), or any object for the caller to read (``doc``).
    """
    kind = media_type(content_type)
    if not kind:
        raise UnsupportedMediaType(
            "missing Content-Type: send image/*, multipart/form-data or application/json"
        )
    source = _stream(body)
    if kind.startswith("image/") or kind in _RAW_TYPES:
        parsed = Body(images=[_read_all(source, limits)])
    elif kind == "multipart/form-data":
        parsed = _from_multipart(content_type or "", source, limits)
    elif _is_json(kind):
        doc = parse_json(_read_all(source, limits))
        if not isinstance(doc, dict):
            raise InvalidInput("the JSON body must be an object")
        entries = doc.get("images", [])
        if not isinstance(entries, list):
            raise InvalidInput('"images" must be a list of {"b64": "..."}')
        _check_count(len(entries), "images", limits)
        parsed = Body(images=[decode_b64(e, i) for i, e in enumerate(entries)], doc=doc)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind} is not accepted: send image/*, multipart/form-data "
            "or application/json"
        )
    _check_count(len(parsed.images), "images", limits)
    for i, image in enumerate(parsed.images):
        if not image:
            raise InvalidInput(f"image {i} is empty")
    return parsed


def _read_all(source: IO[bytes], limits: RequestLimits) -> bytes:
    data = source.read(limits.max_body_bytes + 1)
    if len(data) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body is over the limit of {limits.max_body_bytes} bytes")
    return data


def _check_count(count: int, what: str, limits: RequestLimits) -> None:
    if count > limits.max_images:
        raise PayloadTooLarge(f"{count} {what} in one request; the limit is {limits.max_images}")


def read_images(content_type: str | None, body: BodySource, limits: RequestLimits) -> list[bytes]:
    """The encoded images of a request that must hold at least one."""
    images = parse_body(content_type, body, limits).images
    if not images:
        raise InvalidInput('the request holds no image (send a file field named "image")')
    return images


class _Parts:
    """Collects the parts of a multipart body as python-multipart's parser reports them."""

    def __init__(self, limits: RequestLimits) -> None:
        self.body = Body()
        self.ended = False
        self._limits = limits
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._data: list[bytes] = []

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        self._headers, self._data = {}, []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def _part_end(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        payload = b"".join(self._data)
        if b"filename" in params or name in IMAGE_FIELDS:
            self.body.images.append(payload)
            _check_count(len(self.body.images), "images", self._limits)
        elif name:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"multipart field {name!r} is not UTF-8 text") from e
            self.body.fields.setdefault(name, []).append(text)

    def _end(self) -> None:
        self.ended = True


def _from_multipart(content_type: str, source: IO[bytes], limits: RequestLimits) -> Body:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInput("malformed multipart/form-data body (check the boundary)")
    parts = _Parts(limits)
    parser = MultipartParser(boundary, parts.callbacks())
    total = 0
    try:
        while chunk := source.read(_CHUNK_BYTES):
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise PayloadTooLarge(f"body is over the limit of {limits.max_body_bytes} bytes")
            parser.write(chunk)
    except MultipartParseError as e:
        raise InvalidInput(f"malformed multipart/form-data body (check the boundary): {e}") from e
    if not parts.ended:
        raise InvalidInput("malformed multipart/form-data body (check the boundary)")
    return parts.body


def parse_json(body: bytes) -> Any:
    """The JSON document of ``body``: RFC 8259 only (no NaN or Infinity); integers past 64
    bits are read as floats."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"invalid JSON: {e}") from e


def decode_b64(entry: object, index: int, key: str = "images") -> bytes:
    """The bytes of ``{"b64": "..."}`` (or a bare string), strictly decoded; errors name the
    entry as ``key[index]``."""
    text = entry.get("b64") if isinstance(entry, dict) else entry
    if not isinstance(text, str):
        raise InvalidInput(f'{key}[{index}] must be {{"b64": "<base64>"}}')
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{key}[{index}].b64 is not valid base64: {e}") from e


def read_vectors(value: object, limits: RequestLimits) -> list[list[float]]:
    """The query vectors of ``{"vectors": [[x, ...], ...]}``, checked to be a list of lists
    of JSON numbers (not strings, booleans or null; parse_json reads integers past 64 bits
    as floats), at most
    ``limits.max_images`` of them (each is a query, as an image is). Their dimension, and that
    they are finite and non-zero, are for the service to check: it knows the model."""
    if not isinstance(value, list):
        raise InvalidInput('"vectors" must be a list of lists of numbers')
    for i, vector in enumerate(value):
        if not isinstance(vector, list):
            raise InvalidInput(f"vectors[{i}] must be a list of numbers")
        # type() rather than isinstance(): a bool is an int, and not a coordinate.
        kinds = {type(x) for x in vector}
        if not kinds <= {int, float}:
            raise InvalidInput(f"vectors[{i}] must be a list of numbers")
    if len(value) > limits.max_images:
        raise PayloadTooLarge(
            f"{len(value)} vectors in one request; the limit is {limits.max_images}"
        )
    vectors: list[list[float]] = value
    return vectors


# -- items ------------------------------------------------------------------------------


def check_id(value: object) -> str:
    """A valid item id: a non-empty string of at most MAX_ID_CHARS printable characters."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("every item needs an id: a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidInput(f"id is {len(value)} characters; the limit is {MAX_ID_CHARS}")
    if not value.isprintable():
        raise InvalidInput("id must not hold control characters")
    return value


def check_label(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS or not value.isprintable():
        raise InvalidInput(f"label must be a printable string of at most {MAX_LABEL_CHARS}")
    return value


def check_metadata(value: object) -> dict[str, Any]:
    """A JSON object (or its text) of at most MAX_METADATA_BYTES."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        if len(value.encode("utf-8")) > MAX_METADATA_BYTES:
            raise PayloadTooLarge(f"metadata is over {MAX_METADATA_BYTES} bytes")
        value = parse_json(value.encode("utf-8"))
    if not isinstance(value, dict):
        raise InvalidInput("metadata must be a JSON object")
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise PayloadTooLarge(f"metadata is over {MAX_METADATA_BYTES} bytes")
    return value


def read_items(
    content_type: str | None,
    body: BodySource,
    limits: RequestLimits,
    query: Mapping[str, str],
) -> list[tuple[bytes, AddTask]]:
    """Items to add. Multipart: files ``image`` with fields ``id`` (one per file), ``label``
    and ``metadata`` (one per file, or one for all). JSON: ``{"items": [{"id", "label",
    "metadata", "b64"}]}``. Raw image: ``?id=...&label=...``."""
    kind = media_type(content_type)
    if kind == "application/json" or kind.endswith("+json"):
        doc = parse_body(content_type, body, limits).doc or {}
        entries = doc.get("items")
        if not isinstance(entries, list) or not entries:
            raise InvalidInput('JSON body must be {"items": [{"id": ..., "b64": ...}, ...]}')
        if len(entries) > limits.max_images:
            raise PayloadTooLarge(
                f"{len(entries)} items in one request; the limit is {limits.max_images}"
            )
        items = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InvalidInput(f"items[{i}] must be an object")
            image = decode_b64(entry, i, "items")
            if not image:
                raise InvalidInput(f"items[{i}] has an empty image")
            task = AddTask(
                check_id(entry.get("id")),
                check_label(entry.get("label")),
                check_metadata(entry.get("metadata")),
            )
            items.append((image, task))
        return items
    parsed = parse_body(content_type, body, limits)
    if not parsed.images:
        raise InvalidInput('no image to add (send a file field named "image")')
    n = len(parsed.images)
    fields = dict(parsed.fields)
    for name in ("id", "label", "metadata"):
        if name in query and name not in fields:
            fields[name] = [query[name]]
    ids = fields.get("id", [])
    if len(ids) != n:
        raise InvalidInput(f"{n} image(s) but {len(ids)} id(s): send one id per image")

    def per_image(name: str) -> list[str | None]:
        values = fields.get(name, [])
        if not values:
            return [None] * n
        if len(values) == 1:
            return values * n  # type: ignore[return-value]
        if len(values) != n:
            raise InvalidInput(f"send one {name} for all images or one per image")
        return list(values)

    labels, metadata = per_image("label"), per_image("metadata")
    return [
        (image, AddTask(check_id(i), check_label(label), check_metadata(meta)))
        for image, i, label, meta in zip(parsed.images, ids, labels, metadata, strict=True)
    ]


# -- searches ---------------------------------------------------------------------------


def read_search(
    content_type: str | None,
    body: BodySource,
    limits: RequestLimits,
    query: Mapping[str, str],
) -> SearchRequest:
    """A search: images in any of the three forms, or JSON ``{"vectors": [[...], ...]}``.
    Options (``k``, ``min_score``, ``label``, ``same_class``) come from the JSON body, and
    the query string overrides them."""
    parsed = parse_body(content_type, body, limits)
    options = dict(parsed.doc or {})
    options.update({k: v for k, v in query.items() if k in SearchTask.__dataclass_fields__})
    task = search_task(options)
    if parsed.doc is not None and "vectors" in parsed.doc:
        if parsed.images:
            raise InvalidInput('send "vectors" or "images", not both')
        return SearchRequest(task, vectors=read_vectors(parsed.doc["vectors"], limits))
    if not parsed.images:
        raise InvalidInput('no image to search with (or send {"vectors": [...]})')
    return SearchRequest(task, images=parsed.images)


def search_task(options: Mapping[str, Any]) -> SearchTask:
    """Search options from the query string or JSON body, validated."""
    k = bounded_int(options.get("k", DEFAULT_K), "k", 1, MAX_K)
    return SearchTask(
        k=k,
        min_score=_min_score(options.get("min_score")),
        label=_label_filter(options.get("label")),
        same_class=_flag(options.get("same_class", False), "same_class"),
    )


def _min_score(raw: object) -> float | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidInput(f"min_score must be a number, got {raw!r}")
    try:
        score = float(raw)
    except (ValueError, OverflowError) as e:
        raise InvalidInput(f"min_score must be a number, got {raw!r}") from e
    if not -1.0 <= score <= 1.0:
        raise InvalidInput("min_score must be between -1 and 1 (cosine similarity)")
    return score


def _label_filter(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidInput("label must be a string")
    return raw


def _flag(raw: object, name: str) -> bool:
    if isinstance(raw, str):
        if raw.lower() not in ("", "0", "1", "true", "false"):
            raise InvalidInput(f"{name} must be true or false")
        return raw.lower() in ("1", "true")
    if not isinstance(raw, bool):
        raise InvalidInput(f"{name} must be true or false")
    return raw


def bounded_int(raw: object, name: str, low: int, high: int) -> int:
    """``raw`` (an integer or its text) as an int in ``[low, high]``."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise InvalidInput(f"{name} must be an integer")
    try:
        value = int(raw)
    except ValueError as e:
        raise InvalidInput(f"{name} must be an integer, got {raw!r}") from e
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}, got {value}")
    return value
