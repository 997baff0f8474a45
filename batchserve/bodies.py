"""Reading images out of HTTP request bodies: raw bytes, multipart/form-data, JSON base64.

Pure functions of (content type, body); no Twisted, no Klein. Every failure is a domain
error that api.py maps to a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
from dataclasses import dataclass
from typing import Any

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

#: Multipart fields read as images when a part has no filename.
IMAGE_FIELDS = frozenset({"image", "images", "image[]", "images[]", "file", "files"})

_RAW_TYPES = frozenset({"application/octet-stream"})


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits, in bytes and counts."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 64


def media_type(content_type: str | None) -> str:
    """The lower-cased media type of a Content-Type header, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def read_images(content_type: str | None, body: bytes, limits: RequestLimits) -> list[bytes]:
    """The encoded images in a request body, in order.

    Raw body (``image/*`` or ``application/octet-stream``): one image. Multipart: every
    part with a filename, or named ``image``/``images``/``file``. JSON:
    ``{"images": [{"b64": "..."}, ...]}`` (a ``data:`` URL prefix is allowed).
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
        images = [body]
    elif kind == "multipart/form-data":
        images = _from_multipart(content_type or "", body)
    elif kind == "application/json" or kind.endswith("+json"):
        images = _from_json(body)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind} is not accepted: send image/*, multipart/form-data "
            "or application/json"
        )
    if not images:
        raise InvalidInput("the request holds no image")
    if len(images) > limits.max_images:
        raise PayloadTooLarge(
            f"{len(images)} images in one request; the limit is {limits.max_images}"
        )
    for i, image in enumerate(images):
        if not image:
            raise InvalidInput(f"image {i} is empty")
    return images


def _from_multipart(content_type: str, body: bytes) -> list[bytes]:
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    header = b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = parser.parsebytes(header + body)
    if not message.is_multipart() or message.defects:
        raise InvalidInput("malformed multipart/form-data body (check the boundary)")
    images = []
    for part in message.get_payload():
        if not isinstance(part, email.message.Message):
            continue
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        if filename is None and (not isinstance(name, str) or name not in IMAGE_FIELDS):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise InvalidInput(f"multipart field {name!r} has no file content")
        images.append(payload)
    if not images:
        raise InvalidInput("multipart body has no image file (use a field named 'image')")
    return images


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"invalid JSON: {e}") from e


def _from_json(body: bytes) -> list[bytes]:
    doc = parse_json(body)
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidInput('JSON body must be {"images": [{"b64": "..."}, ...]}')
    return [decode_b64(entry, i) for i, entry in enumerate(entries)]


def decode_b64(entry: object, index: int) -> bytes:
    """The bytes of ``{"b64": "..."}`` (or a bare string), strictly decoded."""
    text = entry.get("b64") if isinstance(entry, dict) else entry
    if not isinstance(text, str):
        raise InvalidInput(f'images[{index}] must be {{"b64": "<base64>"}}')
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"images[{index}].b64 is not valid base64: {e}") from e
