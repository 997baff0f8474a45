"""Hostile input against the real server: every case gets its exact 4xx status, error code
and a message naming what was wrong (never a 5xx), and the server goes on serving.

The table is the list of cases tried, one wrong thing at a time, through every parser: raw,
multipart and JSON images; JSON query vectors; multipart and JSON items; search options in
the query string and the JSON body. A property-based test then throws random requests built
from the API's real keys and options, content types and headers at it."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchserve.storage.records import MAX_METADATA_DEPTH
from batchserve.testing import encode_multipart

from .conftest import Response, Server, start_server, stop_server

MAX_BODY = 2_000_000
MAX_IMAGES = 4
#: The built-in model's embedding size: the dimension every query vector must have.
DIM = 1280


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with small limits, so over-limit cases stay small."""
    running = start_server(
        tmp_path_factory.mktemp("hostile"),
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-images-per-request",
        str(MAX_IMAGES),
        "--no-demo",
    )
    yield running
    stop_server(running)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header that declares ``width`` x ``height`` pixels, with one row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame is rewritten to declare ``width`` x ``height``."""
    data = bytearray(encoded("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encoded(fmt: str, frames: int = 1, size: tuple[int, int] = (64, 48)) -> bytes:
    images = [Image.new("RGB", size, (40 * i % 255, 90, 160)) for i in range(frames)]
    out = io.BytesIO()
    if frames > 1:
        images[0].save(out, format=fmt, save_all=True, append_images=images[1:])
    else:
        images[0].save(out, format=fmt)
    return out.getvalue()


JPEG = encoded("JPEG")
HTML = b"<html><body>hi</body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
B64 = base64.b64encode(JPEG).decode()
TEXT_B64 = base64.b64encode(b"hello").decode()
TIFF_B64 = base64.b64encode(encoded("TIFF")).decode()
#: A valid query vector (any norm > 0 is accepted).
VECTOR = [0.1] * DIM
#: An integer JSON allows and float() cannot hold.
HUGE_INT = 10**400
NAN, INF = float("nan"), float("inf")

#: A request body and its Content-Type (None: no header).
Body = tuple[bytes, str | None]


def raw(data: bytes, ctype: str | None) -> Body:
    return data, ctype


def json_body(doc: object) -> Body:
    """``doc`` as JSON. Python writes float NaN and infinities as the tokens ``NaN``,
    ``Infinity`` and ``-Infinity``, which are not JSON but which the server's parser reads."""
    return json.dumps(doc).encode(), "application/json"


def vectors(*queries: object, **options: object) -> Body:
    """A search by vectors: ``{"vectors": [queries...], **options}``."""
    return json_body({"vectors": list(queries), **options})


def with_first(value: object) -> list[object]:
    """A query vector of the right dimension whose first element is ``value``."""
    return [value, *VECTOR[1:]]


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> Body:
    return encode_multipart(files, fields=fields)


def multipart_item(fields: dict[str, str]) -> Body:
    """One JPEG under ``image`` with ``fields`` (id, label, metadata) as form fields."""
    return multipart(fields, [("image", "a.jpg", JPEG)])


def items(*entries: object) -> Body:
    return json_body({"items": list(entries)})


def nested_text(levels: int) -> str:
    """A JSON object ``levels`` objects deep (written out: the json module would recurse)."""
    return '{"in":' * (levels - 1) + "{}" + "}" * (levels - 1)


def json_item(**fields: object) -> dict[str, object]:
    """A valid JSON item with ``fields`` replaced; a field given as ``...`` is left out."""
    entry: dict[str, object] = {"id": "hostile-item", "label": "x", "metadata": {}, "b64": B64}
    entry.update(fields)
    return {k: v for k, v in entry.items() if v is not ...}


@dataclass(frozen=True)
class Case:
    """One hostile request and the answer it must get. ``says`` is a fragment of the error
    message that shows which check answered: a vector case stopped by "no image" gets the
    same 400 ``invalid_input`` as one stopped by the dimension check."""

    name: str
    method: str
    path: str
    body: bytes
    ctype: str | None
    status: int
    code: str
    says: str


def post(name: str, path: str, body: Body, status: int, code: str, says: str) -> Case:
    return Case(name, "POST", path, *body, status, code, says)


def get(name: str, path: str, status: int, code: str, says: str, method: str = "GET") -> Case:
    return Case(name, method, path, b"", None, status, code, says)


BAD = "invalid_input"
TOO_LARGE = "payload_too_large"
UNSUPPORTED = "unsupported_media_type"
NOT_FOUND = "not_found"

OVER_LIMIT = "over the limit"
UNREADABLE = "cannot identify the data as an image"
SHAPE = f"vectors must be a non-empty list of {DIM}-number lists"
# NaN and Infinity are not JSON (RFC 8259), and a number past a double's range is not read.
NAN_TOKEN = "invalid JSON: unexpected character, expected a JSON value"
MINUS_INF_TOKEN = "invalid JSON: no digit after sign"
PAST_DOUBLE = "invalid JSON: number is infinity when parsed as double"
NOT_NUMBERS = "vectors[0] must be a list of numbers"
NOT_A_LIST = '"vectors" must be a list of lists of numbers'
ONE_VECTOR = vectors(VECTOR)
K_RANGE = "k must be between 1 and 1000"
K_INT = "k must be an integer"
SCORE_NUMBER = "min_score must be a number"
SCORE_RANGE = "min_score must be between -1 and 1"
SAME_CLASS = "same_class must be true or false"
NO_ITEMS = 'JSON body must be {"items": [{"id": ..., "b64": ...}, ...]}'
NO_ID = "every item needs an id: a non-empty string"
LABEL = "label must be a printable string of at most 256"
META_OBJECT = "metadata must be a JSON object"
ITEM_NO_B64 = 'items[0] must be {"b64": "<base64>"}'
TOO_DEEP = f"nested more than {MAX_METADATA_DEPTH} levels deep (objects and lists); the limit is"

EMBED, SEARCH, ITEMS = "/v1/embed", "/v1/search", "/v1/items"

IMAGE_CASES = [
    post("empty body", EMBED, raw(b"", "image/jpeg"), 400, BAD, "image 0 is empty"),
    post("truncated JPEG", EMBED, raw(JPEG[: len(JPEG) // 2], "image/jpeg"), 400, BAD, "image"),
    post("corrupt JPEG", EMBED, raw(JPEG[:20] + b"\x00" * 300, "image/jpeg"), 400, BAD, "image"),
    post("truncated PNG", EMBED, raw(encoded("PNG")[:60], "image/png"), 400, BAD, "image"),
    post(
        "PNG declaring 50000x50000",
        EMBED,
        raw(png_declaring(50000, 50000), "image/png"),
        413,
        TOO_LARGE,
        "pixels",
    ),
    post(
        "JPEG declaring 50000x50000",
        EMBED,
        raw(jpeg_declaring(50000, 50000), "image/jpeg"),
        413,
        TOO_LARGE,
        "pixels",
    ),
    post(
        "animated GIF",
        EMBED,
        raw(encoded("GIF", frames=3), "image/gif"),
        400,
        BAD,
        "animated images are not supported",
    ),
    post("TIFF", EMBED, raw(encoded("TIFF"), "image/tiff"), 415, UNSUPPORTED, "TIFF"),
    post("SVG", EMBED, raw(SVG, "image/svg+xml"), 400, BAD, UNREADABLE),
    post("HTML as text/html", EMBED, raw(HTML, "text/html"), 415, UNSUPPORTED, "text/html"),
    post("HTML as image/jpeg", EMBED, raw(HTML, "image/jpeg"), 400, BAD, UNREADABLE),
    post("text as image/png", EMBED, raw(b"just some text\n", "image/png"), 400, BAD, UNREADABLE),
    post("missing Content-Type", EMBED, raw(JPEG, None), 415, UNSUPPORTED, "missing Content-Type"),
    post("wrong Content-Type", EMBED, raw(JPEG, "application/xml"), 415, UNSUPPORTED, "xml"),
    post("multipart without a file", ITEMS, multipart({"id": "x"}, []), 400, BAD, "no image"),
    post(
        "a multipart field the route does not take",
        EMBED,
        multipart({"note": "x"}, [("image", "a.jpg", JPEG)]),
        400,
        BAD,
        "unknown multipart field 'note'",
    ),
    post(
        "multipart with a bad boundary",
        EMBED,
        raw(b"--zz\r\nnot mime", "multipart/form-data; boundary=other"),
        400,
        BAD,
        "malformed multipart/form-data body",
    ),
    post("invalid JSON", EMBED, raw(b'{"images": [', "application/json"), 400, BAD, "invalid JSON"),
    post(
        "JSON that is not an object",
        EMBED,
        raw(b"[1, 2]", "application/json"),
        400,
        BAD,
        "the JSON body must be an object",
    ),
    post(
        "JSON images not a list",
        EMBED,
        json_body({"images": {"b64": B64}}),
        400,
        BAD,
        '"images" must be a list',
    ),
    post(
        "invalid base64",
        EMBED,
        json_body({"images": [{"b64": "%%%not base64%%%"}]}),
        400,
        BAD,
        "images[0].b64 is not valid base64",
    ),
    post("base64 of text", EMBED, json_body({"images": [{"b64": TEXT_B64}]}), 400, BAD, UNREADABLE),
    post(
        "a URL instead of bytes (never fetched)",
        EMBED,
        json_body({"images": [{"url": "http://127.0.0.1:1/x.jpg"}]}),
        400,
        BAD,
        'images[0] must be {"b64": "<base64>"}',
    ),
    post(
        "huge base64",
        EMBED,
        json_body({"images": [{"b64": "A" * (MAX_BODY + 10)}]}),
        413,
        TOO_LARGE,
        OVER_LIMIT,
    ),
    post(
        "more images than the limit",
        EMBED,
        json_body({"images": [{"b64": B64}] * (MAX_IMAGES + 1)}),
        413,
        TOO_LARGE,
        f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}",
    ),
    post(
        "body over the limit",
        EMBED,
        raw(b"\xff" * (MAX_BODY + 1), "image/jpeg"),
        413,
        TOO_LARGE,
        OVER_LIMIT,
    ),
]

# POST /v1/search {"vectors": [[...], ...]}: the only route that takes vectors.
VECTOR_CASES = [
    post(
        "the singular key vector is not read",
        SEARCH,
        json_body({"vector": VECTOR}),
        400,
        BAD,
        'unknown key "vector" in the JSON body',
    ),
    post("vectors of dimension 3", SEARCH, vectors([0.1] * 3), 400, BAD, SHAPE),
    post("vectors one short of the dimension", SEARCH, vectors(VECTOR[1:]), 400, BAD, SHAPE),
    post("vectors one over the dimension", SEARCH, vectors([*VECTOR, 0.1]), 400, BAD, SHAPE),
    post("a huge vector (100000 numbers)", SEARCH, vectors([0.1] * 100_000), 400, BAD, SHAPE),
    post(
        "a valid vector then one of dimension 3",
        SEARCH,
        vectors(VECTOR, [0.1] * 3),
        400,
        BAD,
        "vectors must be a list of lists of numbers",
    ),
    post("vectors an empty list", SEARCH, vectors(), 400, BAD, SHAPE),
    post("vectors holding an empty vector", SEARCH, vectors([]), 400, BAD, SHAPE),
    post("a NaN token", SEARCH, vectors(with_first(NAN)), 400, BAD, NAN_TOKEN),
    post("all NaN tokens", SEARCH, vectors([NAN] * DIM), 400, BAD, NAN_TOKEN),
    post("an Infinity token", SEARCH, vectors(with_first(INF)), 400, BAD, NAN_TOKEN),
    post("a -Infinity token", SEARCH, vectors(with_first(-INF)), 400, BAD, MINUS_INF_TOKEN),
    post(
        "1e400, read as infinity",
        SEARCH,
        raw(b'{"vectors": [[1e400' + b", 0.1" * (DIM - 1) + b"]]}", "application/json"),
        400,
        BAD,
        PAST_DOUBLE,
    ),
    post(
        "an integer too large for a float",
        SEARCH,
        vectors(with_first(HUGE_INT)),
        400,
        BAD,
        PAST_DOUBLE,
    ),
    post("the string NaN", SEARCH, vectors(with_first("NaN")), 400, BAD, NOT_NUMBERS),
    post("the string Infinity", SEARCH, vectors(with_first("Infinity")), 400, BAD, NOT_NUMBERS),
    post("numbers as strings", SEARCH, vectors(["0.1"] * DIM), 400, BAD, NOT_NUMBERS),
    post("words", SEARCH, vectors(["a"] * DIM), 400, BAD, NOT_NUMBERS),
    post("booleans", SEARCH, vectors([True] * DIM), 400, BAD, NOT_NUMBERS),
    post("a null", SEARCH, vectors(with_first(None)), 400, BAD, NOT_NUMBERS),
    post("an object", SEARCH, vectors(with_first({"x": 0.1})), 400, BAD, NOT_NUMBERS),
    post("vectors nested one level too deep", SEARCH, vectors([VECTOR]), 400, BAD, NOT_NUMBERS),
    post(
        "vectors nested past the JSON parser's depth",
        SEARCH,
        raw(b'{"vectors": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
        400,
        BAD,
        "invalid JSON",
    ),
    post(
        "one vector not wrapped in a list",
        SEARCH,
        json_body({"vectors": VECTOR}),
        400,
        BAD,
        NOT_NUMBERS,
    ),
    post("vectors an object", SEARCH, json_body({"vectors": {"0": VECTOR}}), 400, BAD, NOT_A_LIST),
    post("vectors a string", SEARCH, json_body({"vectors": "0.1, 0.1"}), 400, BAD, NOT_A_LIST),
    post("vectors null", SEARCH, json_body({"vectors": None}), 400, BAD, NOT_A_LIST),
    post("a zero vector", SEARCH, vectors([0.0] * DIM), 400, BAD, "a zero vector has no direction"),
    post(
        "more vectors than max_images_per_request",
        SEARCH,
        vectors(*[VECTOR] * 5),
        413,
        TOO_LARGE,
        "5 vectors in one request; the limit is 4",
    ),
    post(
        "more vectors than the body limit holds",
        SEARCH,
        vectors(*[VECTOR] * (MAX_BODY // (5 * DIM) + 1)),
        413,
        TOO_LARGE,
        OVER_LIMIT,
    ),
    post(
        "vectors and images together",
        SEARCH,
        json_body({"vectors": [VECTOR], "images": [{"b64": B64}]}),
        400,
        BAD,
        'send "vectors" or "images", not both',
    ),
    post(
        "vectors with same_class",
        SEARCH,
        vectors(VECTOR, same_class=True),
        400,
        BAD,
        "same_class needs an image, not a vector",
    ),
    post(
        "vectors as text/plain",
        SEARCH,
        raw(ONE_VECTOR[0], "text/plain"),
        415,
        UNSUPPORTED,
        "text/plain is not accepted",
    ),
]

# Search options, in the query string and the JSON body, on every route that reads them;
# all are checked before any search or inference.
OPTION_CASES = [
    post("k = 0", SEARCH + "?k=0", raw(JPEG, "image/jpeg"), 400, BAD, K_RANGE),
    post("k too large", SEARCH + "?k=1000000", raw(JPEG, "image/jpeg"), 400, BAD, K_RANGE),
    post("k not a number", SEARCH + "?k=ten", raw(JPEG, "image/jpeg"), 400, BAD, K_INT),
    post("query k negative", SEARCH + "?k=-1", ONE_VECTOR, 400, BAD, K_RANGE + ", got -1"),
    post("query k 1001", SEARCH + "?k=1001", ONE_VECTOR, 400, BAD, K_RANGE + ", got 1001"),
    post("query k fractional", SEARCH + "?k=2.5", ONE_VECTOR, 400, BAD, K_INT),
    post("query k empty", SEARCH + "?k=", ONE_VECTOR, 400, BAD, K_INT),
    post("query k over a valid body k", SEARCH + "?k=0", vectors(VECTOR, k=3), 400, BAD, K_RANGE),
    post("body k 0", SEARCH, vectors(VECTOR, k=0), 400, BAD, K_RANGE),
    post("body k huge", SEARCH, vectors(VECTOR, k=HUGE_INT), 400, BAD, PAST_DOUBLE),
    post("body k 2**64", SEARCH, vectors(VECTOR, k=2**64), 400, BAD, K_INT),
    post("body k a float", SEARCH, vectors(VECTOR, k=2.5), 400, BAD, K_INT),
    post("body k a boolean", SEARCH, vectors(VECTOR, k=True), 400, BAD, K_INT),
    post("body k a list", SEARCH, vectors(VECTOR, k=[3]), 400, BAD, K_INT),
    post("query min_score a word", SEARCH + "?min_score=high", ONE_VECTOR, 400, BAD, SCORE_NUMBER),
    post("query min_score 2", SEARCH + "?min_score=2", ONE_VECTOR, 400, BAD, SCORE_RANGE),
    post("query min_score nan", SEARCH + "?min_score=nan", ONE_VECTOR, 400, BAD, SCORE_RANGE),
    post("query min_score -inf", SEARCH + "?min_score=-inf", ONE_VECTOR, 400, BAD, SCORE_RANGE),
    post(
        "body min_score a word", SEARCH, vectors(VECTOR, min_score="high"), 400, BAD, SCORE_NUMBER
    ),
    post(
        "body min_score a boolean", SEARCH, vectors(VECTOR, min_score=True), 400, BAD, SCORE_NUMBER
    ),
    post("body min_score a list", SEARCH, vectors(VECTOR, min_score=[0.5]), 400, BAD, SCORE_NUMBER),
    post(
        "body min_score an integer too large for a float",
        SEARCH,
        vectors(VECTOR, min_score=HUGE_INT),
        400,
        BAD,
        PAST_DOUBLE,
    ),
    post("body min_score a NaN token", SEARCH, vectors(VECTOR, min_score=NAN), 400, BAD, NAN_TOKEN),
    post(
        "body label not a string",
        SEARCH,
        vectors(VECTOR, label=5),
        400,
        BAD,
        "label must be a string",
    ),
    post("query same_class a word", SEARCH + "?same_class=maybe", ONE_VECTOR, 400, BAD, SAME_CLASS),
    post("body same_class a number", SEARCH, vectors(VECTOR, same_class=1), 400, BAD, SAME_CLASS),
    post("body same_class a word", SEARCH, vectors(VECTOR, same_class="yes"), 400, BAD, SAME_CLASS),
    get("similar with k = 0", "/v1/items/any/similar?k=0", 400, BAD, K_RANGE),
    get(
        "similar with min_score a word", "/v1/items/any/similar?min_score=x", 400, BAD, SCORE_NUMBER
    ),
    get(
        "similar with same_class a word", "/v1/items/any/similar?same_class=2", 400, BAD, SAME_CLASS
    ),
    post("classify with k = 0", "/v1/classify?k=0", raw(JPEG, "image/jpeg"), 400, BAD, K_RANGE),
    post("classify with k a word", "/v1/classify?k=five", raw(JPEG, "image/jpeg"), 400, BAD, K_INT),
]

# POST /v1/items, multipart then JSON: every field wrong in turn, the rest valid.
ITEM_CASES = [
    post("empty id", ITEMS, multipart_item({"id": ""}), 400, BAD, NO_ID),
    post("id too long", ITEMS, multipart_item({"id": "x" * 5000}), 400, BAD, "the limit is 256"),
    post("id with a NUL", ITEMS, multipart_item({"id": "a\x00b"}), 400, BAD, "control characters"),
    post("image without an id", ITEMS, multipart_item({}), 400, BAD, "1 image(s) but 0 id(s)"),
    get("id not UTF-8 in the path", "/v1/items/%FF%FE", 400, BAD, "the URL is not valid UTF-8"),
    post(
        "metadata not an object",
        ITEMS,
        multipart_item({"id": "m", "metadata": "[1, 2]"}),
        400,
        BAD,
        META_OBJECT,
    ),
    post(
        "metadata not JSON",
        ITEMS,
        multipart_item({"id": "m", "metadata": "{oops"}),
        400,
        BAD,
        "invalid JSON",
    ),
    post(
        "metadata too large",
        ITEMS,
        multipart_item({"id": "m", "metadata": json.dumps({"x": "y" * 70000})}),
        413,
        TOO_LARGE,
        "metadata is over 16384 bytes",
    ),
    post(
        "metadata with NaN",
        ITEMS,
        multipart_item({"id": "m", "metadata": '{"x": NaN}'}),
        400,
        BAD,
        NAN_TOKEN,
    ),
    post(
        "metadata nested past the depth limit",
        ITEMS,
        multipart_item({"id": "m", "metadata": nested_text(MAX_METADATA_DEPTH + 1)}),
        400,
        BAD,
        TOO_DEEP,
    ),
    post(
        "metadata nested past what the encoder writes",
        ITEMS,
        multipart_item({"id": "m", "metadata": nested_text(300)}),
        400,
        BAD,
        TOO_DEEP,
    ),
    post("JSON without items", ITEMS, json_body({"images": [{"b64": B64}]}), 400, BAD, NO_ITEMS),
    post("JSON items an object", ITEMS, json_body({"items": json_item()}), 400, BAD, NO_ITEMS),
    post("JSON items a string", ITEMS, json_body({"items": "hostile-item"}), 400, BAD, NO_ITEMS),
    post("JSON items null", ITEMS, json_body({"items": None}), 400, BAD, NO_ITEMS),
    post("JSON items an empty list", ITEMS, items(), 400, BAD, NO_ITEMS),
    post(
        "JSON items more than the limit",
        ITEMS,
        items(*[json_item(id=f"n{i}") for i in range(MAX_IMAGES + 1)]),
        413,
        TOO_LARGE,
        f"{MAX_IMAGES + 1} items in one request; the limit is {MAX_IMAGES}",
    ),
    post("JSON item not an object", ITEMS, items(B64), 400, BAD, "items[0] must be an object"),
    post("JSON item without an id", ITEMS, items(json_item(id=...)), 400, BAD, NO_ID),
    post("JSON item with an empty id", ITEMS, items(json_item(id="")), 400, BAD, NO_ID),
    post("JSON item with a numeric id", ITEMS, items(json_item(id=5)), 400, BAD, NO_ID),
    post("JSON item with a null id", ITEMS, items(json_item(id=None)), 400, BAD, NO_ID),
    post(
        "JSON item with an id too long",
        ITEMS,
        items(json_item(id="x" * 257)),
        400,
        BAD,
        "id is 257 characters; the limit is 256",
    ),
    post(
        "JSON item with a newline in its id",
        ITEMS,
        items(json_item(id="a\nb")),
        400,
        BAD,
        "id must not hold control characters",
    ),
    post("JSON item with a numeric label", ITEMS, items(json_item(label=5)), 400, BAD, LABEL),
    post("JSON item with a list label", ITEMS, items(json_item(label=["x"])), 400, BAD, LABEL),
    post(
        "JSON item with a label too long", ITEMS, items(json_item(label="x" * 257)), 400, BAD, LABEL
    ),
    post(
        "JSON item with a bell in its label",
        ITEMS,
        items(json_item(label="a\x07")),
        400,
        BAD,
        LABEL,
    ),
    post(
        "JSON item with list metadata", ITEMS, items(json_item(metadata=[1])), 400, BAD, META_OBJECT
    ),
    post(
        "JSON item with numeric metadata",
        ITEMS,
        items(json_item(metadata=5)),
        400,
        BAD,
        META_OBJECT,
    ),
    post(
        "JSON item with metadata text not JSON",
        ITEMS,
        items(json_item(metadata="{oops")),
        400,
        BAD,
        "invalid JSON",
    ),
    post(
        "JSON item with metadata holding NaN",
        ITEMS,
        items(json_item(metadata={"x": NAN})),
        400,
        BAD,
        NAN_TOKEN,
    ),
    post(
        "JSON item with metadata holding Infinity",
        ITEMS,
        items(json_item(metadata={"x": [INF]})),
        400,
        BAD,
        NAN_TOKEN,
    ),
    post(
        "JSON item with metadata too large",
        ITEMS,
        items(json_item(metadata={"x": "y" * 70000})),
        413,
        TOO_LARGE,
        "metadata is over 16384 bytes",
    ),
    post(
        "JSON item with metadata nested 1000 deep",
        ITEMS,
        raw(
            b'{"items": [{"id": "m", "b64": "%s", "metadata": %s}]}'
            % (B64.encode(), nested_text(1000).encode()),
            "application/json",
        ),
        400,
        BAD,
        TOO_DEEP,
    ),
    post("JSON item without b64", ITEMS, items(json_item(b64=...)), 400, BAD, ITEM_NO_B64),
    post("JSON item with numeric b64", ITEMS, items(json_item(b64=5)), 400, BAD, ITEM_NO_B64),
    post(
        "JSON item with empty b64",
        ITEMS,
        items(json_item(b64="")),
        400,
        BAD,
        "items[0] has an empty image",
    ),
    post(
        "JSON item with b64 not base64",
        ITEMS,
        items(json_item(b64="%%%not base64%%%")),
        400,
        BAD,
        "items[0].b64 is not valid base64",
    ),
    post("JSON item with b64 of text", ITEMS, items(json_item(b64=TEXT_B64)), 400, BAD, UNREADABLE),
    post(
        "JSON item with b64 of a TIFF",
        ITEMS,
        items(json_item(b64=TIFF_B64)),
        415,
        UNSUPPORTED,
        "TIFF",
    ),
    post(
        "JSON items, the second without an id",
        ITEMS,
        items(json_item(id="first"), json_item(id=...)),
        400,
        BAD,
        NO_ID,
    ),
    get("unknown item", "/v1/items/no-such-item", 404, NOT_FOUND, "no item with id"),
    get("similar of an unknown item", "/v1/items/no-such-item/similar", 404, NOT_FOUND, "no item"),
    get("delete of an unknown item", "/v1/items/no-such-item", 404, NOT_FOUND, "no item", "DELETE"),
]

ROUTE_CASES = [
    get("unknown route", "/v1/nothing-here", 404, NOT_FOUND, "not found"),
    get("wrong method", "/v1/embed", 405, "method_not_allowed", "not allowed"),
]

CASES = IMAGE_CASES + VECTOR_CASES + OPTION_CASES + ITEM_CASES + ROUTE_CASES


def send(server: Server, case: Case) -> Response:
    headers = {"Content-Type": case.ctype} if case.ctype else {}
    return server.request(case.method, case.path, case.body or None, headers)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_gets_its_exact_status_code_and_message(strict: Server, case: Case) -> None:
    response = send(strict, case)
    assert response.status == case.status, response.body[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    error = response.json()["error"]
    assert error["code"] == case.code, error
    assert case.says in error["message"], error


def test_after_every_hostile_case_the_server_still_serves(strict: Server) -> None:
    for case in CASES:
        send(strict, case)
    assert strict.request("GET", "/healthz").status == 200
    response = strict.request("POST", "/v1/embed", JPEG, {"Content-Type": "image/jpeg"})
    assert response.status == 200 and len(response.json()["results"][0]["embedding"]) == DIM
    json_type = {"Content-Type": "application/json"}
    response = strict.request("POST", "/v1/search", ONE_VECTOR[0], json_type)
    assert response.status == 200 and len(response.json()["results"]) == 1


def test_a_refused_item_request_stores_none_of_its_items(strict: Server) -> None:
    for case in ITEM_CASES:
        send(strict, case)
    for item_id in ["hostile-item", "first", "m", *(f"n{i}" for i in range(MAX_IMAGES + 1))]:
        assert strict.request("GET", f"/v1/items/{item_id}").status == 404, item_id


# -- random requests from the API's own vocabulary --------------------------------------------

#: JSON values that no field should take whole, and a few that every parser must survive.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([HUGE_INT, -HUGE_INT, 2**63, NAN, INF, -INF, "NaN", "Infinity", "0.1", ""])
)
HOSTILE = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Search option values as the query string carries them.
OPTION_TEXT = st.sampled_from(
    ["3", "0", "-1", "1001", "2.5", "ten", "", "0.5", "nan", "-inf", "1e400", "true", "maybe"]
)
#: Text that http.client and encode_multipart can send (no lone surrogates).
SENDABLE = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
#: Most often no query string, so that the body's checks are reached.
QUERY = st.sampled_from([{}, {}, {"k": "3"}]) | st.dictionaries(
    st.sampled_from(["k", "min_score", "label", "same_class", "id", "metadata"]),
    OPTION_TEXT | SENDABLE,
    max_size=3,
)
#: Search options in a JSON body: a valid value or a hostile one.
SEARCH_OPTIONS = {
    "k": st.integers(1, 20) | OPTION_TEXT | HOSTILE,
    "min_score": st.floats(-1, 1) | OPTION_TEXT | HOSTILE,
    "label": st.just("x") | HOSTILE,
    "same_class": st.booleans() | OPTION_TEXT | HOSTILE,
}
#: No options half the time, so that the checks after theirs are reached.
OPTIONS: st.SearchStrategy[dict[str, object]] = st.just({}) | st.fixed_dictionaries(
    {}, optional=SEARCH_OPTIONS
)
B64S = st.sampled_from(
    [B64, "data:image/jpeg;base64," + B64, "", TEXT_B64, TIFF_B64, "%%%", B64[:101]]
)
IMAGES = st.lists(st.fixed_dictionaries({"b64": B64S}) | B64S, max_size=MAX_IMAGES + 1) | HOSTILE


@st.composite
def query_vectors(draw: st.DrawFn) -> list[list[object]]:
    """Vectors near the valid shape: mostly the right dimension, else one off or none, with
    one element perhaps replaced by a hostile value; zero to one over the image limit."""
    length = draw(st.sampled_from([DIM, DIM, DIM, DIM - 1, DIM + 1, 1, 0]))
    vector: list[object] = [draw(st.floats(-1, 1))] * length
    if length and draw(st.booleans()):
        vector[draw(st.integers(0, length - 1))] = draw(HOSTILE)
    return [vector] * draw(st.integers(0, MAX_IMAGES + 1))


ITEM_FIELDS = {
    "id": st.sampled_from(["fuzz-1", "fuzz/2", "fuzz 3"]) | SENDABLE | HOSTILE,
    "label": st.just("x") | SENDABLE | HOSTILE,
    "metadata": st.dictionaries(st.text(max_size=8), HOSTILE, max_size=4) | SENDABLE | HOSTILE,
    "b64": B64S | HOSTILE,
}
#: An item with an id and an image and perhaps the rest; one with any fields; anything.
ITEM = (
    st.fixed_dictionaries(
        {"id": ITEM_FIELDS["id"], "b64": ITEM_FIELDS["b64"]},
        optional={"label": ITEM_FIELDS["label"], "metadata": ITEM_FIELDS["metadata"]},
    )
    | st.fixed_dictionaries({}, optional={**ITEM_FIELDS, "colour": HOSTILE})
    | HOSTILE
)


def with_options(fields: dict[str, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    """Documents of ``fields`` and perhaps search options."""
    return st.tuples(st.fixed_dictionaries(fields), OPTIONS).map(lambda d: {**d[1], **d[0]})


#: JSON documents, each meant for one route, and one of every key at once.
DOCUMENTS = {
    "vectors": with_options({"vectors": query_vectors() | HOSTILE}),
    "items": st.fixed_dictionaries({"items": st.lists(ITEM, max_size=MAX_IMAGES + 1) | HOSTILE}),
    "images": with_options({"images": IMAGES}),
    "keys": st.fixed_dictionaries(
        {},
        optional={
            "images": IMAGES,
            "vectors": query_vectors() | HOSTILE,
            "vector": HOSTILE,
            "items": st.lists(ITEM, max_size=2) | HOSTILE,
            **SEARCH_OPTIONS,
            **ITEM_FIELDS,
        },
    ),
}
ROUTES = [
    ("POST", "/v1/embed"),
    ("POST", "/v1/classify"),
    ("POST", "/v1/search"),
    ("POST", "/v1/items"),
    ("GET", "/v1/items/x/similar"),
]
#: The route each kind of body is meant for (the others go to any route).
ROUTE_FOR = {
    "vectors": ("POST", "/v1/search"),
    "items": ("POST", "/v1/items"),
    "multipart item": ("POST", "/v1/items"),
}
CONTENT_TYPES = st.sampled_from(
    [
        "image/jpeg",
        "image/png",
        "application/octet-stream",
        "application/json",
        "multipart/form-data; boundary=b",
        "multipart/form-data",
        "text/plain",
        "",
    ]
) | st.text(max_size=40)
JSON_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "x/y+json"])


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> Body:
    """A body of ``kind`` and its Content-Type: a JSON document of the API's keys (mostly
    sent as JSON, so that it reaches the parsers), a multipart item, a mutated JPEG, a
    multipart text part, or any bytes."""
    if kind in DOCUMENTS:
        doc = json.dumps(draw(DOCUMENTS[kind])).encode()
        return doc, draw(CONTENT_TYPES) if draw(st.integers(0, 4)) == 0 else draw(JSON_TYPES)
    if kind == "multipart item":
        fields = st.dictionaries(st.sampled_from(["id", "label", "metadata"]), SENDABLE)
        return multipart_item(draw(fields))
    if kind == "mutated":
        data = bytearray(JPEG)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))]), draw(CONTENT_TYPES)
    if kind == "multipart":
        text = draw(st.text(max_size=200))
        part = f'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n{text}\r\n--b--\r\n'
        return part.encode("utf-8", "surrogatepass"), draw(CONTENT_TYPES)
    return draw(st.binary(max_size=4096)), draw(CONTENT_TYPES)


#: Kinds of body, JSON documents of the API's keys weighted up: they reach the most parsers.
KINDS = [*DOCUMENTS, "vectors", "items", "multipart item", "mutated", "multipart", "bytes"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, str | None]:
    """(method, path with a query string, body, Content-Type)."""
    kind = draw(st.sampled_from(KINDS))
    route = ROUTE_FOR.get(kind)
    if route is None or draw(st.integers(0, 3)) == 0:
        route = draw(st.sampled_from(ROUTES))
    method, path = route
    query = draw(QUERY)
    if query:
        path += "?" + urlencode(query)
    return (method, path, *draw(bodies(kind)))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    request=requests(),
    extra=st.dictionaries(
        st.sampled_from(["Accept", "X-Request-Id", "Authorization", "Content-Encoding"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        max_size=3,
    ),
)
def test_no_request_gets_a_5xx_and_every_refusal_says_why(
    strict: Server, request: tuple[str, str, bytes, str | None], extra: dict[str, str]
) -> None:
    method, path, data, ctype = request
    headers = {**extra, "Content-Type": ctype} if ctype and ctype.isprintable() else dict(extra)
    try:
        response = strict.request(method, path, data, headers)
    except ValueError:
        return  # http.client refused to send the header; the server never saw it
    assert response.status < 500, (path, ctype, data[:80], response.body[:200])
    if response.status >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"], error
        assert isinstance(error["message"], str) and error["message"], error
    assert strict.request("GET", "/healthz").status == 200


# -- keys a JSON body does not take, floods of multipart parts and of GIF frames ----------------


def gif_of_frames(count: int) -> bytes:
    """A GIF of ``count`` one-pixel frames, written by hand (Pillow would take minutes)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    control = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    frame = control + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame * count + b"\x3b"


#: 1.65 MB of parts with no name, under MAX_BODY: only the part limit refuses them.
PART_FLOOD = b"--b\r\n\r\nx\r\n" * 150_000 + b"--b--\r\n"

FLOOD_CASES = [
    post(
        "a misspelt key of a JSON item",
        ITEMS,
        items(json_item(label=..., lable="x")),
        400,
        BAD,
        'unknown key "lable" in items[0]; valid: b64, id, label, metadata',
    ),
    post(
        "a key beside the items",
        ITEMS,
        json_body({"items": [json_item()], "label": "x"}),
        400,
        BAD,
        'unknown key "label" in the JSON body; valid: items',
    ),
    post(
        "an option embed does not take in its body",
        EMBED,
        json_body({"images": [{"b64": B64}], "k": 3}),
        400,
        BAD,
        'unknown key "k" in the JSON body; valid: images',
    ),
    post(
        "a key beside b64 in an image",
        EMBED,
        json_body({"images": [{"b64": B64, "url": "http://127.0.0.1:1/x.jpg"}]}),
        400,
        BAD,
        'unknown key "url" in images[0]; valid: b64',
    ),
    post(
        "a misspelt search option",
        SEARCH,
        vectors(VECTOR, min_scor=0.5),
        400,
        BAD,
        'unknown key "min_scor" in the JSON body; valid: images, k, label, min_score',
    ),
    post(
        "150000 nameless multipart parts",
        EMBED,
        raw(PART_FLOOD, "multipart/form-data; boundary=b"),
        413,
        TOO_LARGE,
        f"over {4 * MAX_IMAGES} parts in one multipart body",
    ),
    post(
        "a GIF of 80000 frames",
        EMBED,
        raw(gif_of_frames(80_000), "image/gif"),
        400,
        BAD,
        "animated images are not supported",
    ),
]


@pytest.mark.parametrize("case", FLOOD_CASES, ids=[c.name for c in FLOOD_CASES])
def test_an_unknown_key_or_a_flood_gets_its_exact_status_and_message(
    strict: Server, case: Case
) -> None:
    response = send(strict, case)
    assert response.status == case.status, response.body[:300]
    error = response.json()["error"]
    assert error["code"] == case.code and case.says in error["message"], error


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([1, 2**62, 4, 3], []),  # numpy's product of it wraps to 0, the size of no data
        ([1, 2**63, 2, 3], []),  # past int64
        ([1, 1, 1, 3], ["0", "1", "2"]),  # numbers as strings
        ([1, 1, 1, 3], [0.0, 1.0, 2.0]),
    ],
)
def test_a_v2_shape_past_its_limit_or_data_not_of_its_datatype_is_400(
    strict: Server, shape: list[int], data: list[object]
) -> None:
    model = strict.request("GET", "/v1/model").json()["name"]
    tensor = {"name": "PIXELS", "datatype": "UINT8", "shape": shape, "data": data}
    body = json.dumps({"inputs": [tensor]}).encode()
    response = strict.request(
        "POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"}
    )
    assert response.status == 400, response.body[:300]
    assert "shape" in response.json()["error"] or "0-255" in response.json()["error"]


# -- what one request may cost the decode pool: its pixels, its deadline, its client ----------

#: The pixel budget of one request on ``budgeted``: 17 images of 25 MP are over it.
REQUEST_PIXELS = 400_000_000


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with one decode thread, so that a request's images decode one after another
    and a later request waits for them."""
    running = start_server(
        tmp_path_factory.mktemp("budgeted"),
        "--decode-threads",
        "1",
        "--max-request-pixels",
        str(REQUEST_PIXELS),
        "--no-demo",
    )
    yield running
    stop_server(running)


def slow_pngs(count: int) -> Body:
    """``count`` white 2500x2000 PNGs (19 kB each; about 0.1 s each to decode and trim here)."""
    out = io.BytesIO()
    Image.new("RGB", (2500, 2000), (255, 255, 255)).save(out, "PNG")
    return multipart({}, [("image", f"{i}.png", out.getvalue()) for i in range(count)])


def decoded_images(server: Server) -> float:
    from .conftest import metric

    return metric(server, "batchserve_decode_seconds_count")


def test_a_request_over_its_pixel_budget_is_413_naming_it(budgeted: Server) -> None:
    body, ctype = multipart(
        {}, [("image", f"{i}.jpg", jpeg_declaring(5000, 5000)) for i in range(17)]
    )
    assert ctype is not None
    before = decoded_images(budgeted)
    response = budgeted.request("POST", EMBED, body, {"Content-Type": ctype})
    assert response.status == 413, response.body[:300]
    error = response.json()["error"]
    assert error["code"] == TOO_LARGE and "max_request_pixels" in error["message"], error
    assert f"limit for one request is {REQUEST_PIXELS} pixels" in error["message"], error
    assert decoded_images(budgeted) == before  # refused from the headers


def test_a_request_past_its_deadline_stops_decoding_its_images(budgeted: Server) -> None:
    body, ctype = slow_pngs(64)  # about 7 s of decoding; the deadline is 1 s
    assert ctype is not None
    response = budgeted.request(
        "POST", EMBED, body, {"Content-Type": ctype, "X-Timeout-Ms": "1000"}
    )
    assert response.status == 504, response.body[:300]
    message = response.json()["error"]["message"]
    assert "of 64 decoded; the rest were not" in message, message
    assert int(message.split("(")[1].split(" of ")[0]) < 64


def test_a_client_that_hangs_up_stops_the_decoding_of_its_images(budgeted: Server) -> None:
    import socket

    from .conftest import wait_until

    body, ctype = slow_pngs(64)  # about 7 s of decoding
    before = decoded_images(budgeted)
    head = (
        f"POST {EMBED} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", budgeted.port)) as hung_up:
        hung_up.sendall(head.encode() + body)
        # Hang up once its images decode (before, Twisted closes the body it would read).
        wait_until(lambda: decoded_images(budgeted) > before, "its first image decoded")
        at_hang_up = decoded_images(budgeted) - before
    # One decode thread: this embed decodes once the hung-up request's decoding stopped.
    response = budgeted.request("POST", EMBED, JPEG, {"Content-Type": "image/jpeg"})
    assert response.status == 200, response.body[:300]
    decoded = decoded_images(budgeted) - before - 1
    assert decoded <= at_hang_up + 10 and decoded < 64, (at_hang_up, decoded)


def test_an_ordinary_request_is_answered_while_slow_images_decode(budgeted: Server) -> None:
    import socket

    from .conftest import wait_until

    body, ctype = slow_pngs(64)  # about 7 s of decoding each, within the pixel budget
    head = (
        f"POST {EMBED} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    before = decoded_images(budgeted)
    hostile = [socket.create_connection(("127.0.0.1", budgeted.port)) for _ in range(2)]
    try:
        for connection in hostile:
            connection.sendall(head + body)
        wait_until(lambda: decoded_images(budgeted) >= before + 2, "both decoding")
        # One decode thread, taken in turns image by image: this one waits for an image of
        # each slow request, not for their 14 s.
        response = budgeted.request(
            "POST", EMBED, JPEG, {"Content-Type": "image/jpeg", "X-Timeout-Ms": "3000"}
        )
        assert response.status == 200, response.body[:300]
    finally:
        for connection in hostile:
            connection.close()  # hung up: their decoding stops


def pipelined_404s(port: int, paths: list[str]) -> int:
    """GET each path on one keep-alive connection, all sent ahead (pipelined), and count
    the 404s that come back."""
    import socket
    import threading

    wire = b"".join(f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for p in paths)
    found, tail = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        sender = threading.Thread(target=connection.sendall, args=(wire,), daemon=True)
        sender.start()
        while found < len(paths):
            chunk = connection.recv(1 << 20)
            assert chunk, f"closed after {found} answers"
            seen = tail + chunk
            found += seen.count(b"HTTP/1.1 404 ")
            tail = seen[-12:]
        sender.join(60)
    return found


def test_unknown_asset_names_by_the_thousand_leave_memory_where_it_was(strict: Server) -> None:
    # Each name 8 kB, as tried: the old cache of misses grew ~170 MB over 20,000 of them.
    from bench.harness.procs import tree_rss_bytes

    names = [f"/web/{i:05d}{'x' * 8000}" for i in range(20_000)]
    pipelined_404s(strict.port, names[:2_000])  # the allocator's own warm-up
    before = tree_rss_bytes(strict.process.pid)
    assert pipelined_404s(strict.port, names) == len(names)
    grown = tree_rss_bytes(strict.process.pid) - before
    assert grown < 32 * 2**20, f"resident memory grew {grown / 2**20:.0f} MiB"


# -- pages of other sites, names re-pointed at the server, slow clients (no token set) --------


def test_a_form_posted_from_another_site_adds_nothing_and_the_servers_own_page_adds(
    strict: Server,
) -> None:
    body, ctype = multipart({"id": "from-a-page"}, [("image", "a.jpg", JPEG)])
    assert ctype is not None
    elsewhere = {"Content-Type": ctype, "Origin": "http://evil.example"}
    response = strict.request("POST", ITEMS, body, {**elsewhere, "Sec-Fetch-Site": "cross-site"})
    assert response.status == 403 and response.json()["error"]["code"] == "forbidden"
    assert strict.request("GET", f"{ITEMS}/from-a-page").status == 404
    own = {"Content-Type": ctype, "Origin": f"http://127.0.0.1:{strict.port}"}
    response = strict.request("POST", ITEMS, body, {**own, "Sec-Fetch-Site": "same-origin"})
    assert response.status == 200, response.body[:300]
    assert strict.request("DELETE", f"{ITEMS}/from-a-page", None, own).status == 200


def test_a_name_re_pointed_at_the_server_is_misdirected_and_no_version_is_told(
    strict: Server,
) -> None:
    rebound = {"Host": f"rebind.evil.example:{strict.port}"}
    response = strict.request("GET", ITEMS, None, rebound)
    assert response.status == 421, response.body[:300]
    assert response.json()["error"]["code"] == "misdirected_request"
    assert strict.request("GET", "/healthz", None, rebound).status == 200
    assert strict.request("GET", "/healthz").headers["server"] == "batchserve"


def test_headers_sent_a_byte_at_a_time_are_cut_off_after_header_timeout_s(
    strict: Server,
) -> None:
    import select
    import socket
    import time

    answer = b""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        while time.monotonic() - started < 30:
            if select.select([sock], [], [], 0.5)[0]:  # a byte every 0.5 s until answered
                chunk = sock.recv(65536)
                answer += chunk
                if not chunk:
                    break
                continue
            sock.sendall(b"a")
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"request_timeout"' in answer
    assert 9.5 < elapsed < 25, elapsed  # --header-timeout-s 10, from the first byte
