"""Reading images, items and options out of HTTP request bodies: raw bytes,
multipart/form-data, JSON with base64.

Pure functions of (content type, body); no Twisted, no Klein. Every failure is a domain
error that api.py maps to a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import json
from dataclasses import dataclass, field
from typing import Any

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

#: Multipart fields read as images when a part has no filename.
IMAGE_FIELDS = frozenset({"image", "images", "image[]", "images[]", "file", "files"})

_RAW_TYPES = frozenset({"application/octet-stream"})

MAX_ID_CHARS = 256
MAX_LABEL_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits, in bytes and counts."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 64


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


def parse_body(content_type: str | None, body: bytes, limits: RequestLimits) -> Body:
    """Split a request body into images, fields and JSON, checking the limits.

    Raw body (``image/*`` or ``application/octet-stream``): one image. Multipart: every
    part with a filename, or named ``image``/``images``/``file``, is an image; other parts
    are text fields. JSON: ``{"images": [{"b64": "..."}, ...]}`` (a ``data:`` URL prefix is
    allowed), or any object for the caller to read (``doc``).
    """
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(
            f"body is {len(body)} bytes; the limit is {limits.max_body_bytes} bytes"
        )
    kind = media_type(content_type)
    if not kind:
        raise UnsupportedMediaType(
            "missing Content-Type: send image/*, multipart/form-data or application/json"
        )
    if kind.startswith("image/") or kind in _RAW_TYPES:
        parsed = Body(images=[body])
    elif kind == "multipart/form-data":
        parsed = _from_multipart(content_type or "", body)
    elif kind == "application/json" or kind.endswith("+json"):
        doc = parse_json(body)
        if not isinstance(doc, dict):
            raise InvalidInput("the JSON body must be an object")
        entries = doc.get("images", [])
        if not isinstance(entries, list):
            raise InvalidInput('"images" must be a list of {"b64": "..."}')
        parsed = Body(images=[decode_b64(e, i) for i, e in enumerate(entries)], doc=doc)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind} is not accepted: send image/*, multipart/form-data "
            "or application/json"
        )
    if len(parsed.images) > limits.max_images:
        raise PayloadTooLarge(
            f"{len(parsed.images)} images in one request; the limit is {limits.max_images}"
        )
    for i, image in enumerate(parsed.images):
        if not image:
            raise InvalidInput(f"image {i} is empty")
    return parsed


def read_images(content_type: str | None, body: bytes, limits: RequestLimits) -> list[bytes]:
    """The encoded images of a request that must hold at least one."""
    images = parse_body(content_type, body, limits).images
    if not images:
        raise InvalidInput('the request holds no image (send a file field named "image")')
    return images


def _from_multipart(content_type: str, body: bytes) -> Body:
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    header = b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = parser.parsebytes(header + body)
    if not message.is_multipart() or message.defects:
        raise InvalidInput("malformed multipart/form-data body (check the boundary)")
    parsed = Body()
    for part in message.get_payload():
        if not isinstance(part, email.message.Message):
            continue
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise InvalidInput(f"multipart field {name!r} has no content")
        if filename is not None or (isinstance(name, str) and name in IMAGE_FIELDS):
            parsed.images.append(payload)
        elif isinstance(name, str):
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(f"multipart field {name!r} is not UTF-8 text") from e
            parsed.fields.setdefault(name, []).append(text)
    return parsed


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
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


def _fit_floats(numbers: list[Any]) -> bool:
    """Whether every integer of ``numbers`` converts to a float: JSON gives the other numbers
    as floats already, but an integer may be too large for one."""
    try:
        for x in numbers:
            if type(x) is int:
                float(x)
    except OverflowError:
        return False
    return True


def read_vectors(value: object, limits: RequestLimits) -> list[list[float]]:
    """The query vectors of ``{"vectors": [[x, ...], ...]}``, checked to be a list of lists
    of JSON numbers that fit a float (not strings, booleans or null), at most
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
        if int in kinds and not _fit_floats(vector):
            raise InvalidInput(f"vectors[{i}] holds a number too large for a float")
    if len(value) > limits.max_images:
        raise PayloadTooLarge(
            f"{len(value)} vectors in one request; the limit is {limits.max_images}"
        )
    vectors: list[list[float]] = value
    return vectors


# -- items ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemInput:
    image: bytes
    id: str
    label: str | None
    metadata: dict[str, Any]


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
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError as e:  # NaN or Infinity: stored, it would be served back as invalid JSON
        raise InvalidInput("metadata must not hold NaN or Infinity") from e
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise PayloadTooLarge(f"metadata is over {MAX_METADATA_BYTES} bytes")
    return value


def read_items(
    content_type: str | None,
    body: bytes,
    limits: RequestLimits,
    query: dict[str, str],
) -> list[ItemInput]:
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
            items.append(
                ItemInput(
                    image,
                    check_id(entry.get("id")),
                    check_label(entry.get("label")),
                    check_metadata(entry.get("metadata")),
                )
            )
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
        ItemInput(image, check_id(i), check_label(label), check_metadata(meta))
        for image, i, label, meta in zip(parsed.images, ids, labels, metadata, strict=True)
    ]
