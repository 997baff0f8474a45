"""Reading request bodies: the streaming multipart parser, JSON, and search options."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.http.bodies import RequestLimits, parse_body, read_images
from batchserve.http.inputs import read_items, read_search
from batchserve.serving.records import AddTask, SearchTask
from batchserve.storage.records import parse_json
from batchserve.testing import encode_multipart

LIMITS = RequestLimits(max_body_bytes=8 * 1024 * 1024, max_images=4)


def test_a_multipart_body_spooled_to_a_file_is_parsed_across_chunk_boundaries() -> None:
    # Three parts of ~1.5 MB: every part spans the parser's 1 MiB chunks.
    images = [os.urandom(1_500_000) for _ in range(3)]
    body, content_type = encode_multipart(
        [("image", f"{i}.jpg", data) for i, data in enumerate(images)], {"id": "x"}
    )
    with tempfile.TemporaryFile() as spooled:  # as Twisted keeps a large body
        spooled.write(body)
        spooled.seek(0)
        parsed = parse_body(content_type, spooled, LIMITS, text_fields={"id"})
    assert parsed.images == images
    assert parsed.fields == {"id": ["x"]}


def test_parts_named_as_images_are_images_and_other_parts_are_text_fields() -> None:
    body, content_type = encode_multipart([("upload", "a.png", b"A")], {"label": "cat"})
    body = body.replace(b'; filename="a.png"', b"")  # a part named "upload" with no filename
    images_too, _ = encode_multipart([("file", "b.png", b"B")])
    fields = parse_body(content_type, body, LIMITS, text_fields={"label", "upload"}).fields
    assert fields == {"label": ["cat"], "upload": ["A"]}
    assert parse_body(content_type, images_too, LIMITS).images == [b"B"]


def test_a_multipart_text_field_the_route_does_not_take_is_refused_by_name() -> None:
    body, content_type = encode_multipart([("image", "a.png", b"A")], {"lable": "cat"})
    with pytest.raises(InvalidInput, match=r"unknown multipart field 'lable'.*id, label, metadata"):
        parse_body(content_type, body, LIMITS, text_fields={"id", "label", "metadata"})
    with pytest.raises(InvalidInput, match="this route takes no text field"):
        parse_body(content_type, body, LIMITS)


@pytest.mark.parametrize(
    "cut",
    [
        lambda body: body[: len(body) // 2],  # the upload stopped half-way
        lambda body: body[: -len(b"--\r\n") - len(b"batchserve-test-boundary")],  # no close
        lambda body: body.replace(b"batchserve-test-boundary", b"another-boundary"),
    ],
)
def test_a_multipart_body_that_does_not_close_its_boundary_is_invalid(cut: object) -> None:
    body, content_type = encode_multipart([("image", "a.jpg", b"\xff\xd8data")])
    with pytest.raises(InvalidInput, match="malformed multipart/form-data body"):
        parse_body(content_type, cut(body), LIMITS)  # type: ignore[operator]


def test_multipart_without_a_boundary_parameter_is_invalid() -> None:
    body, _ = encode_multipart([("image", "a.jpg", b"x")])
    with pytest.raises(InvalidInput, match="check the boundary"):
        parse_body("multipart/form-data", body, LIMITS)


def test_the_fifth_image_part_is_refused_at_once() -> None:
    body, content_type = encode_multipart([("image", f"{i}.jpg", b"x") for i in range(5)])
    with pytest.raises(PayloadTooLarge, match="5 images in one request; the limit is 4"):
        parse_body(content_type, body, LIMITS)


def test_a_body_over_the_limit_is_refused_while_it_is_read() -> None:
    small = RequestLimits(max_body_bytes=1000, max_images=4)
    body, content_type = encode_multipart([("image", "a.jpg", os.urandom(2000))])
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000 bytes"):
        parse_body(content_type, body, small)
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000 bytes"):
        parse_body("image/jpeg", os.urandom(1001), small)


def test_json_is_strict_and_reads_integers_past_64_bits_as_floats() -> None:
    assert parse_json(b'{"a": 100000000000000000000000}') == {"a": 1e23}
    for bad in (b"[NaN]", b"[1e400]", b'{"a": ', b"\xff"):
        with pytest.raises(InvalidInput, match="invalid JSON"):
            parse_json(bad)


def test_query_string_options_override_the_json_body() -> None:
    body = b'{"vectors": [[1, 0]], "k": 3, "label": "a"}'
    request = read_search("application/json", body, LIMITS, {"k": "7", "other": "x"})
    assert request.task == SearchTask(k=7, label="a")
    assert request.vectors == [[1, 0]] and request.images == []


def test_multipart_items_take_one_label_for_all_and_one_id_each() -> None:
    body, content_type = encode_multipart(
        [("image", "a.jpg", b"A"), ("image", "b.jpg", b"B")], {"label": "cat"}
    )
    body = body.replace(
        b"--batchserve-test-boundary\r\n",
        b'--batchserve-test-boundary\r\nContent-Disposition: form-data; name="id"\r\n\r\n'
        b"a1\r\n--batchserve-test-boundary\r\n"
        b'Content-Disposition: form-data; name="id"\r\n\r\nb1\r\n'
        b"--batchserve-test-boundary\r\n",
        1,
    )
    assert read_items(content_type, body, LIMITS, {}) == [
        (b"A", AddTask("a1", "cat", {})),
        (b"B", AddTask("b1", "cat", {})),
    ]


B64 = "eA=="  # base64 of b"x"


@pytest.mark.parametrize(
    ("read", "body", "says"),
    [
        (
            "images",
            {"images": [B64], "k": 3},
            'unknown key "k" in the JSON body; valid: images',
        ),
        (
            "images",
            {"images": [{"b64": B64, "name": "a.jpg"}]},
            'unknown key "name" in images[0]; valid: b64',
        ),
        (
            "search",
            {"vectors": [[1, 0]], "lable": "a", "kk": 3},
            'unknown keys "lable", "kk" in the JSON body; valid: images, k, label, min_score, '
            "same_class, vectors, verify",
        ),
        (
            "items",
            {"items": [{"id": "a", "b64": B64, "lable": "cat"}]},
            'unknown key "lable" in items[0]; valid: b64, id, label, metadata',
        ),
        (
            "items",
            {"items": [{"id": "a", "b64": B64}], "label": "cat"},
            'unknown key "label" in the JSON body; valid: items',
        ),
    ],
)
def test_an_unknown_json_key_is_refused_naming_it_and_the_valid_keys(
    read: str, body: dict[str, object], says: str
) -> None:
    data = json.dumps(body).encode()
    with pytest.raises(InvalidInput) as refused:
        if read == "images":
            read_images("application/json", data, LIMITS)
        elif read == "search":
            read_search("application/json", data, LIMITS, {})
        else:
            read_items("application/json", data, LIMITS, {})
    assert str(refused.value) == says


def test_an_error_names_a_few_unknown_keys_each_cut_short() -> None:
    doc = {"images": [B64], **{f"{i}" * 100: i for i in range(1, 6)}}
    with pytest.raises(InvalidInput) as refused:
        read_images("application/json", json.dumps(doc).encode(), LIMITS)
    message = str(refused.value)
    assert message.startswith(f'unknown keys "{"1" * 40}...", "{"2" * 40}...", "{"3" * 40}..."')
    assert " and 2 more in the JSON body" in message and "4" * 41 not in message


def test_json_bodies_of_only_valid_keys_are_read() -> None:
    body = {"images": [{"b64": B64}, B64]}
    assert read_images("application/json", json.dumps(body).encode(), LIMITS) == [b"x", b"x"]
    items = {"items": [{"id": "a", "label": "l", "metadata": {"n": 1}, "b64": B64}]}
    assert read_items("application/json", json.dumps(items).encode(), LIMITS, {}) == [
        (b"x", AddTask("a", "l", {"n": 1}))
    ]
    search = {"images": [B64], "k": 2, "min_score": 0.5, "label": "l", "same_class": True}
    request = read_search("application/json", json.dumps(search).encode(), LIMITS, {})
    assert request.task == SearchTask(k=2, min_score=0.5, label="l", same_class=True)


def nameless_parts(count: int, close: bool = True) -> tuple[bytes, str]:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return part * count + (b"--b--\r\n" if close else b""), "multipart/form-data; boundary=b"


def test_a_multipart_body_of_more_parts_than_its_images_and_their_fields_is_413() -> None:
    assert LIMITS.max_parts == 16  # 4 images, each with an id, a label and metadata
    body, content_type = nameless_parts(16)
    assert parse_body(content_type, body, LIMITS).images == []
    body, content_type = nameless_parts(17)
    with pytest.raises(PayloadTooLarge, match="over 16 parts in one multipart body"):
        parse_body(content_type, body, LIMITS)


def test_a_flood_of_parts_is_refused_once_past_the_limit_not_parsed_to_its_end() -> None:
    # Never closed: parsed to its end, the body would be refused as malformed instead.
    body, content_type = nameless_parts(100_000, close=False)
    with pytest.raises(PayloadTooLarge, match="the limit is 16"):
        parse_body(content_type, body, LIMITS)


def test_as_many_parts_as_the_most_images_with_all_their_fields_are_read() -> None:
    fields = [
        (name, f"{name}-{i}".encode() if name != "metadata" else b"{}")
        for i in range(4)
        for name in ("id", "label", "metadata")
    ]
    files = [("image", f"{i}.jpg", bytes([65 + i])) for i in range(4)]
    body, content_type = encode_multipart(files)
    head = body.split(b"--batchserve-test-boundary--")[0]
    parts = b"".join(
        b"--batchserve-test-boundary\r\nContent-Disposition: form-data; "
        b'name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
        for name, value in fields
    )
    body = head + parts + b"--batchserve-test-boundary--\r\n"
    added = read_items(content_type, body, LIMITS, {})
    assert [task.id for _, task in added] == ["id-0", "id-1", "id-2", "id-3"]
