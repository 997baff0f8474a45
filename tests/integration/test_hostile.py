"""Hostile input against the real server: every case gets a clear 4xx (never a 5xx), and
the server goes on serving. The table is the list of cases tried; a property-based test
then throws random bodies, content types and headers at it."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchserve.testing import encode_multipart

from .conftest import Server, start_server, stop_server

MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with small limits, so over-limit cases stay small."""
    running = start_server(
        tmp_path_factory.mktemp("hostile"),
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-images-per-request",
        "4",
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


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    return encode_multipart(files, fields=fields)


JPEG = encoded("JPEG")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
B64 = base64.b64encode(JPEG).decode()


def json_body(doc: object) -> tuple[bytes, str]:
    return json.dumps(doc).encode(), "application/json"


def item(fields: dict[str, str]) -> tuple[bytes, str]:
    return multipart(fields, [("image", "a.jpg", JPEG)])


# (name, method, path, body, content type or None, expected status)
CASES: list[tuple[str, str, str, bytes, str | None, int]] = [
    ("empty body", "POST", "/v1/embed", b"", "image/jpeg", 400),
    ("truncated JPEG", "POST", "/v1/embed", JPEG[: len(JPEG) // 2], "image/jpeg", 400),
    ("corrupt JPEG", "POST", "/v1/embed", JPEG[:20] + b"\x00" * 300, "image/jpeg", 400),
    ("truncated PNG", "POST", "/v1/embed", encoded("PNG")[:60], "image/png", 400),
    (
        "PNG declaring 50000x50000",
        "POST",
        "/v1/embed",
        png_declaring(50000, 50000),
        "image/png",
        413,
    ),
    (
        "JPEG declaring 50000x50000",
        "POST",
        "/v1/embed",
        jpeg_declaring(50000, 50000),
        "image/jpeg",
        413,
    ),
    ("animated GIF", "POST", "/v1/embed", encoded("GIF", frames=3), "image/gif", 400),
    ("TIFF", "POST", "/v1/embed", encoded("TIFF"), "image/tiff", 415),
    ("SVG", "POST", "/v1/embed", SVG, "image/svg+xml", 400),
    ("HTML as text/html", "POST", "/v1/embed", b"<html><body>hi</body></html>", "text/html", 415),
    ("HTML as image/jpeg", "POST", "/v1/embed", b"<html><body>hi</body></html>", "image/jpeg", 400),
    ("text as image/png", "POST", "/v1/embed", b"just some text\n", "image/png", 400),
    ("missing Content-Type", "POST", "/v1/embed", JPEG, None, 415),
    ("wrong Content-Type", "POST", "/v1/embed", JPEG, "application/xml", 415),
    ("multipart without a file", "POST", "/v1/embed", *multipart({"note": "x"}, []), 400),
    (
        "multipart with a bad boundary",
        "POST",
        "/v1/embed",
        b"--zz\r\nnot mime",
        "multipart/form-data; boundary=other",
        400,
    ),
    ("invalid JSON", "POST", "/v1/embed", b'{"images": [', "application/json", 400),
    ("JSON that is not an object", "POST", "/v1/embed", b"[1, 2]", "application/json", 400),
    (
        "invalid base64",
        "POST",
        "/v1/embed",
        *json_body({"images": [{"b64": "%%%not base64%%%"}]}),
        400,
    ),
    (
        "base64 of text",
        "POST",
        "/v1/embed",
        *json_body({"images": [{"b64": base64.b64encode(b"hello").decode()}]}),
        400,
    ),
    (
        "a URL instead of bytes (never fetched)",
        "POST",
        "/v1/embed",
        *json_body({"images": [{"url": "http://127.0.0.1:1/x.jpg"}]}),
        400,
    ),
    (
        "huge base64",
        "POST",
        "/v1/embed",
        *json_body({"images": [{"b64": "A" * (MAX_BODY + 10)}]}),
        413,
    ),
    (
        "more images than the limit",
        "POST",
        "/v1/embed",
        *json_body({"images": [{"b64": B64}] * 5}),
        413,
    ),
    ("body over the limit", "POST", "/v1/embed", b"\xff" * (MAX_BODY + 1), "image/jpeg", 413),
    ("empty id", "POST", "/v1/items", *item({"id": ""}), 400),
    ("id too long", "POST", "/v1/items", *item({"id": "x" * 5000}), 400),
    ("id with a NUL", "POST", "/v1/items", *item({"id": "a\x00b"}), 400),
    ("id not UTF-8 in the path", "GET", "/v1/items/%FF%FE", b"", None, 400),
    ("metadata not an object", "POST", "/v1/items", *item({"id": "m", "metadata": "[1, 2]"}), 400),
    ("metadata not JSON", "POST", "/v1/items", *item({"id": "m", "metadata": "{oops"}), 400),
    (
        "metadata too large",
        "POST",
        "/v1/items",
        *item({"id": "m", "metadata": json.dumps({"x": "y" * 70000})}),
        413,
    ),
    ("k = 0", "POST", "/v1/search?k=0", JPEG, "image/jpeg", 400),
    ("k too large", "POST", "/v1/search?k=1000000", JPEG, "image/jpeg", 400),
    ("k not a number", "POST", "/v1/search?k=ten", JPEG, "image/jpeg", 400),
    ("vector of the wrong dimension", "POST", "/v1/search", *json_body({"vector": [0.1] * 3}), 400),
    (
        "vector with NaN",
        "POST",
        "/v1/search",
        b'{"vector": [' + b"NaN, " * 1279 + b"NaN]}",
        "application/json",
        400,
    ),
    ("vector of strings", "POST", "/v1/search", *json_body({"vector": ["a"] * 1280}), 400),
    ("unknown item", "GET", "/v1/items/no-such-item", b"", None, 404),
    ("unknown route", "GET", "/v1/nothing-here", b"", None, 404),
    ("wrong method", "GET", "/v1/embed", b"", None, 405),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "ctype", "status"), CASES, ids=[c[0] for c in CASES]
)
def test_hostile_case_gets_a_clear_4xx(
    strict: Server, name: str, method: str, path: str, body: bytes, ctype: str | None, status: int
) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    response = strict.request(method, path, body or None, headers)
    assert response.status == status, (name, response.body[:300])
    error = response.json()["error"]
    assert error["code"] and error["message"]


def test_after_every_hostile_case_the_server_still_serves(strict: Server) -> None:
    for _name, method, path, body, ctype, _status in CASES:
        strict.request(method, path, body or None, {"Content-Type": ctype} if ctype else {})
    assert strict.request("GET", "/healthz").status == 200
    response = strict.request("POST", "/v1/embed", JPEG, {"Content-Type": "image/jpeg"})
    assert response.status == 200 and len(response.json()["results"][0]["embedding"]) == 1280


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


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "mutated", "json", "multipart"]))
    if kind == "bytes":
        return draw(st.binary(max_size=4096))
    if kind == "mutated":
        data = bytearray(JPEG)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "json":
        value = st.recursive(
            st.none() | st.booleans() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        )
        doc = draw(st.dictionaries(st.sampled_from(["images", "vector", "k", "b64", "x"]), value))
        return json.dumps(doc).encode()
    text = draw(st.text(max_size=200))
    return f'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n{text}\r\n--b--\r\n'.encode(
        "utf-8", "surrogatepass"
    )


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(
        ["/v1/embed", "/v1/classify", "/v1/search", "/v1/search?k=3", "/v1/items", "/v1/items?id=x"]
    ),
    body=bodies(),
    ctype=CONTENT_TYPES,
    extra=st.dictionaries(
        st.sampled_from(["Accept", "X-Request-Id", "Authorization", "Content-Encoding"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        max_size=3,
    ),
)
def test_no_body_or_header_gets_a_5xx(
    strict: Server, path: str, body: bytes, ctype: str, extra: dict[str, str]
) -> None:
    headers = {**extra, "Content-Type": ctype} if ctype.isprintable() else dict(extra)
    try:
        response = strict.request("POST", path, body, headers)
    except ValueError:
        return  # http.client refused to send the header; the server never saw it
    assert response.status < 500, (path, ctype, body[:80], response.body[:200])
    assert strict.request("GET", "/healthz").status == 200
