"""Reading images, items and options out of HTTP request bodies: raw bytes,
multipart/form-data, JSON with base64.

Pure functions of (content type, body); no Twisted, no Klein. The service runs them on the
decode pool, never on the reactor. Every failure is a domain error that the HTTP layer maps
to a 4xx.
A body is bytes or a readable binary file (Twisted spools a large body to a temporary file);
multipart bodies are parsed as a stream, a megabyte at a time.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import IO, TYPE_CHECKING, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from batchserve.settings import setting
from batchserve.storage.records import parse_json

#: Multipart fields read as images when a part has no filename.
IMAGE_FIELDS = frozenset({"image", "images", "image[]", "images[]", "file", "files"})

_RAW_TYPES = frozenset({"application/octet-stream"})

#: The keys of a JSON body of images (/v1/embed, /v1/classify), and of each of its images.
IMAGE_KEYS = frozenset({"images"})
B64_KEYS = frozenset({"b64"})

#: Parts a multipart body may hold per image it may carry: the image and its id, label and
#: metadata (/v1/items).
PARTS_PER_IMAGE = 4

#: Unknown keys named in an error at most, and the characters of each shown.
_NAMED_KEYS, _KEY_CHARS = 3, 40


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

    @property
    def max_parts(self) -> int:
        """Most parts in a multipart body: ``PARTS_PER_IMAGE`` for each image it may carry."""
        return PARTS_PER_IMAGE * self.max_images


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


def is_json(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def _stream(body: BodySource) -> IO[bytes]:
    return BytesIO(body) if isinstance(body, bytes) else body


def check_keys(doc: Mapping[str, object], valid: Collection[str], where: str) -> None:
    """Refuse a JSON object holding a key outside ``valid`` (a misspelt key is never
    silently ignored): InvalidInput naming the unknown keys ``where`` and the valid ones."""
    unknown = [key for key in doc if key not in valid]
    if not unknown:
        return
    named = ", ".join(_quoted(key) for key in unknown[:_NAMED_KEYS])
    if len(unknown) > _NAMED_KEYS:
        named += f" and {len(unknown) - _NAMED_KEYS} more"
    plural = "s" if len(unknown) > 1 else ""
    raise InvalidInput(f"unknown key{plural} {named} in {where}; valid: {', '.join(sorted(valid))}")


def _quoted(key: str) -> str:
    return f'"{key}"' if len(key) <= _KEY_CHARS else f'"{key[:_KEY_CHARS]}..."'


def read_json(body: BodySource, limits: RequestLimits) -> dict[str, Any]:
    """The JSON object of a body, checking its size."""
    doc = parse_json(_read_all(_stream(body), limits))
    if not isinstance(doc, dict):
        raise InvalidInput("the JSON body must be an object")
    return doc


def parse_body(
    content_type: str | None,
    body: BodySource,
    limits: RequestLimits,
    json_keys: Collection[str] = IMAGE_KEYS,
    text_fields: Collection[str] = (),
) -> Body:
    """Split a request body into images, fields and JSON, checking the limits.

    Raw body (``image/*`` or ``application/octet-stream``): one image. Multipart: every
    part with a filename, or named ``image``/``images``/``file``, is an image; other parts
    are text fields; at most ``limits.max_parts`` parts. JSON: ``{"images": [{"b64":
    "..."}, ...]}`` (a ``data:`` URL prefix is allowed), with no key outside ``json_keys``;
    the others are for the caller to read (``doc``). A multipart text field not named in
    ``text_fields`` is refused, as an unknown JSON key is (a typo loses nothing silently).
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
        check_fields(parsed.fields, text_fields)
    elif is_json(kind):
        doc = read_json(source, limits)
        check_keys(doc, json_keys, "the JSON body")
        entries = doc.get("images", [])
        if not isinstance(entries, list):
            raise InvalidInput('"images" must be a list of {"b64": "..."}')
        check_count(len(entries), "images", limits)
        parsed = Body(images=[_image_b64(e, i) for i, e in enumerate(entries)], doc=doc)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind} is not accepted: send image/*, multipart/form-data "
            "or application/json"
        )
    check_count(len(parsed.images), "images", limits)
    for i, image in enumerate(parsed.images):
        if not image:
            raise InvalidInput(f"image {i} is empty")
    return parsed


def check_fields(fields: Collection[str], known: Collection[str]) -> None:
    """InvalidInput naming the first multipart text field not in ``known``."""
    unknown = sorted(set(fields) - set(known))
    if unknown:
        takes = ", ".join(sorted(known))
        raise InvalidInput(
            f"unknown multipart field {unknown[0]!r}: send images as file parts"
            + (f", and text fields {takes}" if takes else " (this route takes no text field)")
        )


def _read_all(source: IO[bytes], limits: RequestLimits) -> bytes:
    data = source.read(limits.max_body_bytes + 1)
    if len(data) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body is over the limit of {limits.max_body_bytes} bytes")
    return data


def check_count(count: int, what: str, limits: RequestLimits) -> None:
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
        self._parts = 0

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
        # Counted as each part begins: a flood of tiny parts stops here, not after the body.
        self._parts += 1
        if self._parts > self._limits.max_parts:
            limits = self._limits
            raise PayloadTooLarge(
                f"over {limits.max_parts} parts in one multipart body; the limit is "
                f"{limits.max_parts}: an image and its id, label and metadata for each of "
                f"{limits.max_images} images"
            )
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
            check_count(len(self.body.images), "images", self._limits)
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


def _image_b64(entry: object, index: int) -> bytes:
    """``images[index]`` decoded: ``{"b64": "..."}`` with no other key, or a bare string."""
    image = decode_b64(entry, index)  # a missing b64 is named before any other key
    if isinstance(entry, dict):
        check_keys(entry, B64_KEYS, f"images[{index}]")
    return image


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
