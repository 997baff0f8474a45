"""The Python client against a scripted API (httpx.MockTransport): the requests it builds,
how it reads answers and errors, when it retries (with a fake sleep), and the async client
doing the same. No network, no real sleep."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import json
import pickle
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from batchserve.client import (
    AsyncClient,
    BatchserveError,
    Client,
    ConnectionFailed,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    Label,
    NewItem,
    NotFound,
    PayloadTooLarge,
    Retry,
    ServerError,
    TimedOut,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from batchserve.client.retry import backoff_s
from batchserve.client.uploads import sniff

URL = "http://api.test"
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg"
PNG = b"\x89PNG\r\n\x1a\n" + b"png"
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 "
GIF = b"GIF89a" + b"gif"
BMP = b"BM" + b"bmp"
ITEM = {
    "id": "a/b",
    "label": "pets",
    "metadata": {"n": 1},
    "created": "2026-11-29T21:36:01.123Z",
    "class": "pug",
}
MATCH = {"id": "a/b", "score": 0.5, "label": None, "metadata": {}, "class": "pug"}

Answer = httpx.Response | Exception


class Api:
    """A scripted server: answers requests in turn with ``answers`` (the last one again
    once they run out), or with ``handler``; keeps every request."""

    def __init__(
        self, *answers: Answer, handler: Callable[[httpx.Request], Answer] | None = None
    ) -> None:
        self.answers = list(answers)
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.handler(request) if self.handler else self.answers[0]
        if len(self.answers) > 1:
            self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, **kwargs: Any) -> Client:
        return Client(URL, transport=httpx.MockTransport(self), sleep=self.sleeps.append, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncClient:
        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        return AsyncClient(URL, transport=httpx.MockTransport(self), sleep=sleep, **kwargs)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def ok(doc: Any) -> httpx.Response:
    return httpx.Response(200, json=doc)


def error(status: int, code: str, message: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(
        status, headers=headers, json={"error": {"code": code, "message": message}}
    )


def embeddings(rows: list[list[float]]) -> httpx.Response:
    return ok({"model": "m", "dim": len(rows[0]), "results": [{"embedding": r} for r in rows]})


def parts(request: httpx.Request) -> list[tuple[str, str | None, str | None, bytes]]:
    """(field name, filename, content type, content) of each part of a multipart body."""
    head = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n"
    message = email.message_from_bytes(head + request.content, policy=email.policy.HTTP)
    return [
        (
            str(part.get_param("name", header="content-disposition")),
            part.get_filename(),
            part.get("content-type"),
            part.get_payload(decode=True),
        )
        for part in message.iter_parts()  # type: ignore[attr-defined]
    ]


def fields(request: httpx.Request, name: str) -> list[str]:
    return [content.decode() for field, _, _, content in parts(request) if field == name]


def run(coroutine: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coroutine

    return asyncio.run(main())


# -- requests ---------------------------------------------------------------------------


def test_images_go_as_multipart_image_parts_typed_by_their_magic_bytes(tmp_path: Path) -> None:
    api = Api(embeddings([[1.0]] * 4))
    photo = tmp_path / "photo.webp"
    photo.write_bytes(WEBP)
    gif = io.BytesIO(GIF)
    api.client().embed([JPEG, str(photo), gif, b"not an image"])
    assert api.last.method == "POST" and api.last.url.path == "/v1/embed"
    assert parts(api.last) == [
        ("image", "0.jpg", "image/jpeg", JPEG),
        ("image", "photo.webp", "image/webp", WEBP),
        ("image", "2.gif", "image/gif", GIF),
        ("image", "3", "application/octet-stream", b"not an image"),
    ]


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (JPEG, "image/jpeg"),
        (PNG, "image/png"),
        (WEBP, "image/webp"),
        (b"GIF87a...", "image/gif"),
        (GIF, "image/gif"),
        (BMP, "image/bmp"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", "application/octet-stream"),
        (b"", "application/octet-stream"),
    ],
)
def test_content_type_is_guessed_from_the_first_bytes(data: bytes, content_type: str) -> None:
    assert sniff(data)[0] == content_type


def test_one_path_or_file_is_one_image_read_and_named(tmp_path: Path) -> None:
    api = Api(embeddings([[1.0]]))
    (tmp_path / "cat.png").write_bytes(PNG)
    client = api.client()
    client.embed(tmp_path / "cat.png")
    assert parts(api.last) == [("image", "cat.png", "image/png", PNG)]
    with open(tmp_path / "cat.png", "rb") as file:
        client.embed(file)
    assert parts(api.last) == [("image", "cat.png", "image/png", PNG)]
    client.embed(io.BytesIO(b"line 1\nline 2\n"))
    assert parts(api.last) == [("image", "0", "application/octet-stream", b"line 1\nline 2\n")]


@pytest.mark.parametrize(
    ("call", "path"),
    [
        (lambda c: c.get("a/b"), "/v1/items/a%2Fb"),
        (lambda c: c.delete("50% off"), "/v1/items/50%25%20off"),
        (lambda c: c.thumbnail("x?y#z"), "/v1/items/x%3Fy%23z/thumbnail"),
        (lambda c: c.similar("a/b/c"), "/v1/items/a%2Fb%2Fc/similar"),
        (lambda c: c.get("é"), "/v1/items/%C3%A9"),
    ],
)
def test_an_item_id_is_one_percent_encoded_path_segment(
    call: Callable[[Client], Any], path: str
) -> None:
    api = Api(ok({**ITEM, "results": [{"matches": []}]}))
    call(api.client())
    assert api.last.url.raw_path.decode().split("?")[0] == path


def test_an_empty_item_id_is_refused_before_sending() -> None:
    api = Api(ok(ITEM))
    with pytest.raises(ValueError, match="empty"):
        api.client().get("")
    assert api.requests == []


def test_search_sends_its_filters_and_deadline_in_the_query() -> None:
    api = Api(ok({"results": [{"matches": []}]}))
    client = api.client()
    client.search(JPEG, k=3, label="pets", same_class=True, min_score=0.25, timeout_ms=2000)
    assert dict(api.last.url.params) == {
        "k": "3",
        "label": "pets",
        "same_class": "true",
        "min_score": "0.25",
        "timeout_ms": "2000",
    }
    client.search(JPEG)
    assert dict(api.last.url.params) == {"k": "10"}
    client.similar("x", 4, label="a b", min_score=-0.5)
    assert dict(api.last.url.params) == {"k": "4", "label": "a b", "min_score": "-0.5"}
    client.search(JPEG, verify=True)
    assert dict(api.last.url.params) == {"k": "10", "verify": "true"}
    client.similar("x", verify=False)
    assert dict(api.last.url.params) == {"k": "10", "verify": "false"}


def test_embed_classify_and_add_pass_timeout_ms_to_the_server() -> None:
    answers = {"results": [{"labels": []}], "added": ["x"]}
    api = Api(handler=lambda r: embeddings([[1.0]]) if "embed" in r.url.path else ok(answers))
    client = api.client()
    client.embed(JPEG, timeout_ms=1500)
    assert api.last.url.params["timeout_ms"] == "1500"
    client.classify(JPEG, k=2, timeout_ms=1600)
    assert dict(api.last.url.params) == {"k": "2", "timeout_ms": "1600"}
    client.add(id="x", image=JPEG, timeout_ms=1700)
    assert dict(api.last.url.params) == {"timeout_ms": "1700"}


def test_a_deadline_longer_than_the_timeout_lengthens_the_wait_for_that_call() -> None:
    api = Api(embeddings([[1.0]]))
    client = api.client(timeout_s=5.0)
    client.embed(JPEG, timeout_ms=60_000)
    assert api.last.extensions["timeout"]["read"] == 61.0
    client.embed(JPEG, timeout_ms=2000)
    assert api.last.extensions["timeout"]["read"] == 5.0


def test_search_by_vectors_sends_json_rows_of_one_or_many_vectors() -> None:
    api = Api(ok({"results": [{"matches": []}]}))
    client = api.client()
    client.search(vectors=np.array([[0.5, 0.25], [1.0, 0.0]]), k=2)
    assert api.last.headers["content-type"] == "application/json"
    assert json.loads(api.last.content) == {"vectors": [[0.5, 0.25], [1.0, 0.0]]}
    assert dict(api.last.url.params) == {"k": "2"}
    client.search(vectors=[0.5, 0.25])
    assert json.loads(api.last.content) == {"vectors": [[0.5, 0.25]]}


def test_search_takes_images_or_vectors_exactly_one() -> None:
    client = Api(ok({})).client()
    with pytest.raises(ValueError, match="exactly one"):
        client.search()
    with pytest.raises(ValueError, match="exactly one"):
        client.search(JPEG, vectors=[[1.0]])
    with pytest.raises(ValueError, match="shape"):
        client.search(vectors=np.zeros((2, 2, 2)))


def test_a_token_goes_in_every_request_as_a_bearer_header() -> None:
    api = Api(ok({}))
    api.client(token="s3cret").model()
    assert api.last.headers["authorization"] == "Bearer s3cret"
    api.client().model()
    assert "authorization" not in api.last.headers


def test_add_sends_an_id_label_and_metadata_per_image_in_one_request() -> None:
    api = Api(ok({"added": ["a", "b/c"]}))
    added = api.client().add(
        [NewItem("a", JPEG, label="pets", metadata={"n": 1}), NewItem("b/c", PNG)]
    )
    assert added == ["a", "b/c"]
    assert len(api.requests) == 1 and api.last.url.path == "/v1/items"
    assert fields(api.last, "id") == ["a", "b/c"]
    assert fields(api.last, "label") == ["pets", ""]
    assert fields(api.last, "metadata") == ['{"n": 1}', ""]
    assert [p[3] for p in parts(api.last) if p[0] == "image"] == [JPEG, PNG]


def test_add_takes_one_item_as_keywords_or_one_new_item() -> None:
    api = Api(ok({"added": ["one"]}))
    client = api.client()
    assert client.add(id="one", image=JPEG, label="l", metadata={"k": "v"}) == ["one"]
    assert (fields(api.last, "id"), fields(api.last, "label")) == (["one"], ["l"])
    assert client.add(NewItem("one", JPEG)) == ["one"]
    assert fields(api.last, "id") == ["one"]
    with pytest.raises(TypeError):
        client.add(NewItem("one", JPEG), id="two", image=JPEG)
    with pytest.raises(TypeError):
        client.add(id="one")
    with pytest.raises(TypeError):
        client.add([("one", JPEG)])  # type: ignore[list-item]
    assert client.add([]) == [] and len(api.requests) == 2


def test_add_splits_a_long_list_into_requests_of_at_most_64_items() -> None:
    api = Api(handler=lambda r: ok({"added": fields(r, "id")}))
    ids = [f"item-{i}" for i in range(130)]
    assert api.client().add([NewItem(i, JPEG) for i in ids]) == ids
    assert [len(fields(r, "id")) for r in api.requests] == [64, 64, 2]


# -- answers ----------------------------------------------------------------------------


def test_embeddings_are_float32_one_row_per_image_even_for_a_single_image() -> None:
    api = Api(embeddings([[0.5, 0.25, 0.125]]), embeddings([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    client = api.client()
    one = client.embed(JPEG)
    assert one.dtype == np.float32 and one.shape == (1, 3)
    assert one.tolist() == [[0.5, 0.25, 0.125]]
    two = client.embed([JPEG, PNG])
    assert two.shape == (2, 3) and two[1].tolist() == [0.0, 1.0, 0.0]


def test_answers_are_read_into_records() -> None:
    labels = ok({"results": [{"labels": [{"label": "pug", "score": 0.75}]}]})
    api = Api(labels, ok({"results": [{"matches": [MATCH]}]}), ok(ITEM))
    client = api.client()
    assert client.classify(JPEG, k=1) == [[Label("pug", 0.75)]]
    assert api.last.url.params["k"] == "1"
    [[match]] = client.search(JPEG)
    assert (match.id, match.score, match.predicted_class) == ("a/b", 0.5, "pug")
    item = client.get("a/b")
    assert item.created == datetime(2026, 11, 29, 21, 36, 1, 123000, tzinfo=UTC)
    assert (item.label, item.metadata, item.predicted_class) == ("pets", {"n": 1}, "pug")


def test_a_verified_match_carries_its_evidence() -> None:
    verified = {**MATCH, "verified": True, "inliers": 40, "transform": "mirrored similarity"}
    api = Api(ok({"results": [{"matches": [verified, {**MATCH, "verified": None}]}]}))
    [[copy, unverifiable]] = api.client().search(JPEG, verify=True)
    assert (copy.verified, copy.inliers, copy.transform) == (True, 40, "mirrored similarity")
    assert (unverifiable.verified, unverifiable.inliers) == (None, None)


def test_copies_asks_for_each_images_verified_copies() -> None:
    copy = {**MATCH, "verified": True, "inliers": 25, "transform": "similarity"}
    api = Api(ok({"results": [{"copies": [copy]}, {"copies": []}]}))
    found = api.client().copies([JPEG, JPEG], timeout_ms=900)
    assert api.last.url.path == "/v1/duplicates" and api.last.url.params["timeout_ms"] == "900"
    assert [[(m.id, m.verified, m.inliers) for m in ms] for ms in found] == [
        [("a/b", True, 25)],
        [],
    ]


def test_similar_gives_the_matches_of_its_one_result() -> None:
    api = Api(ok({"results": [{"matches": [MATCH, {**MATCH, "id": "c"}]}]}))
    matches = api.client().similar("x", 2)
    assert [m.id for m in matches] == ["a/b", "c"]


def test_thumbnail_index_model_and_delete_read_their_answers() -> None:
    api = Api(
        httpx.Response(200, content=b"\xff\xd8jpeg", headers={"Content-Type": "image/jpeg"}),
        ok({"kind": "flat", "size": 8}),
        ok({"name": "m", "dim": 1280}),
        ok({"deleted": "x"}),
    )
    client = api.client()
    assert client.thumbnail("x") == b"\xff\xd8jpeg"
    assert client.index_info() == {"kind": "flat", "size": 8}
    assert client.model() == {"name": "m", "dim": 1280}
    assert client.delete("x") is None and api.last.method == "DELETE"
    assert [r.url.path for r in api.requests] == [
        "/v1/items/x/thumbnail",
        "/v1/index",
        "/v1/model",
        "/v1/items/x",
    ]


def test_ready_is_true_on_200_and_false_on_503_without_retrying() -> None:
    api = Api(httpx.Response(200, json={"status": "ready"}))
    assert api.client().ready() is True
    api = Api(error(503, "not_ready", "loading", retry_after="5"))
    assert api.client().ready() is False
    assert len(api.requests) == 1 and api.sleeps == []


def test_items_follows_next_cursors_until_the_last_page() -> None:
    pages = {
        None: {"items": [ITEM, {**ITEM, "id": "b"}], "next": "41"},
        "41": {"items": [{**ITEM, "id": "c"}], "next": "7"},
        "7": {"items": [], "next": None},
    }
    api = Api(handler=lambda r: ok(pages[r.url.params.get("cursor")]))
    assert [i.id for i in api.client().items(limit=2)] == ["a/b", "b", "c"]
    assert [dict(r.url.params) for r in api.requests] == [
        {"limit": "2"},
        {"limit": "2", "cursor": "41"},
        {"limit": "2", "cursor": "7"},
    ]


def test_items_fetches_a_page_only_when_it_is_read() -> None:
    api = Api(ok({"items": [ITEM, ITEM], "next": "5"}))
    assert len(list(islice(api.client().items(), 2))) == 2
    assert len(api.requests) == 1


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, InvalidInput),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (413, PayloadTooLarge),
        (415, UnsupportedMediaType),
        (503, Unavailable),
        (504, DeadlineExceeded),
        (500, ServerError),
        (502, ServerError),
        (409, BatchserveError),
    ],
)
def test_an_api_error_raises_its_class_with_the_servers_code_and_message(
    status: int, kind: type[BatchserveError]
) -> None:
    api = Api(error(status, "some_code", "what went wrong"))
    with pytest.raises(BatchserveError) as raised:
        api.client(retries=Retry(attempts=1)).model()
    assert type(raised.value) is kind
    assert (raised.value.status, raised.value.code) == (status, "some_code")
    assert raised.value.message == "what went wrong"
    assert str(raised.value) == f"{status} some_code: what went wrong"


def test_an_error_without_the_apis_body_keeps_its_status_and_text() -> None:
    api = Api(httpx.Response(502, text="<h1>Bad Gateway</h1>"))
    with pytest.raises(ServerError) as raised:
        api.client().model()
    assert (raised.value.code, raised.value.message) == ("http_502", "<h1>Bad Gateway</h1>")


def test_an_error_survives_pickling_with_its_fields() -> None:
    error = Unavailable(503, "overloaded", "queue full", 2.0)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.status, copy.code, copy.message, copy.retry_after_s) == (
        Unavailable,
        503,
        "overloaded",
        "queue full",
        2.0,
    )


# -- retries ----------------------------------------------------------------------------


def test_a_503_is_retried_after_its_retry_after_capped_by_max_delay() -> None:
    api = Api(
        error(503, "overloaded", "full", retry_after="2"),
        error(503, "overloaded", "full", retry_after="30"),
        embeddings([[1.0]]),
    )
    client = api.client(retries=Retry(attempts=3, max_delay_s=5.0))
    assert client.embed(JPEG).tolist() == [[1.0]]
    assert api.sleeps == [2.0, 5.0]
    assert len(api.requests) == 3


def test_a_503_without_retry_after_backs_off_exponentially_with_jitter() -> None:
    api = Api(error(503, "overloaded", "full"))
    with pytest.raises(Unavailable):
        api.client(retries=Retry(attempts=4, backoff_s=0.1, max_delay_s=0.3)).model()
    first, second, third = api.sleeps
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2 and 0.15 <= third <= 0.3


def test_backoff_doubles_from_backoff_s_jittered_between_half_and_all_of_it() -> None:
    policy = Retry(backoff_s=0.1, max_delay_s=1.0)
    assert [backoff_s(policy, n, rng=lambda: 1.0) for n in (1, 2, 3, 5)] == [0.1, 0.2, 0.4, 1.0]
    assert backoff_s(policy, 2, rng=lambda: 0.0) == 0.1


def test_retries_give_up_after_attempts_with_the_last_error() -> None:
    api = Api(error(503, "not_ready", "the model is loading", retry_after="1"))
    with pytest.raises(Unavailable) as raised:
        api.client(retries=Retry(attempts=3)).classify(JPEG)
    assert raised.value.message == "the model is loading" and raised.value.retry_after_s == 1.0
    assert len(api.requests) == 3 and api.sleeps == [1.0, 1.0]


def test_one_attempt_means_no_retry() -> None:
    api = Api(error(503, "overloaded", "full", retry_after="1"))
    with pytest.raises(Unavailable):
        api.client(retries=Retry(attempts=1)).embed(JPEG)
    assert len(api.requests) == 1 and api.sleeps == []


@pytest.mark.parametrize(
    ("status", "kind"), [(400, InvalidInput), (500, ServerError), (504, DeadlineExceeded)]
)
def test_other_errors_than_503_are_not_retried(status: int, kind: type[BatchserveError]) -> None:
    api = Api(error(status, "code", "k must be between 1 and 1000, got 0"))
    with pytest.raises(kind, match="k must be between"):
        api.client().search(JPEG, k=0)
    assert len(api.requests) == 1 and api.sleeps == []


def test_an_add_is_retried_on_503_as_nothing_was_taken() -> None:
    api = Api(error(503, "overloaded", "full", retry_after="1"), ok({"added": ["x"]}))
    assert api.client().add(id="x", image=JPEG) == ["x"]
    assert len(api.requests) == 2 and fields(api.requests[1], "id") == ["x"]


def test_a_refused_connection_is_retried_for_any_call_then_raises_connection_failed() -> None:
    api = Api(httpx.ConnectError("refused"))
    with pytest.raises(ConnectionFailed, match="ConnectError: refused") as raised:
        api.client(retries=Retry(attempts=3)).add(id="x", image=JPEG)
    assert len(api.requests) == 3 and len(api.sleeps) == 2
    assert raised.value.status == 0 and raised.value.code == "connection_failed"


@pytest.mark.parametrize(
    ("call", "attempts"),
    [
        (lambda c: c.embed(JPEG), 2),
        (lambda c: c.get("x"), 2),
        (lambda c: c.add(id="x", image=JPEG), 1),
        (lambda c: c.delete("x"), 1),
    ],
)
def test_a_connection_broken_after_sending_is_retried_only_for_calls_safe_to_repeat(
    call: Callable[[Client], Any], attempts: int
) -> None:
    api = Api(httpx.RemoteProtocolError("server disconnected"))
    with pytest.raises(ConnectionFailed):
        call(api.client(retries=Retry(attempts=2)))
    assert len(api.requests) == attempts


def test_a_read_timeout_raises_timed_out_without_retrying() -> None:
    api = Api(httpx.ReadTimeout("slow"))
    with pytest.raises(TimedOut):
        api.client().embed(JPEG)
    assert len(api.requests) == 1


def test_wait_ready_polls_until_ready() -> None:
    api = Api(httpx.ConnectError("refused"), error(503, "not_ready", "loading"), ok({}))
    api.client().wait_ready(timeout_s=10, poll_s=0.5)
    assert len(api.requests) == 3 and api.sleeps == [0.5, 0.5]


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (error(503, "not_ready", "loading"), Unavailable),
        (httpx.ConnectError("no"), ConnectionFailed),
    ],
)
def test_wait_ready_raises_what_it_last_saw_once_its_time_is_up(
    answer: Answer, kind: type[BatchserveError]
) -> None:
    now = [0.0]
    api = Api(answer)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    client = Client(URL, transport=httpx.MockTransport(api), sleep=sleep, clock=lambda: now[0])
    with pytest.raises(kind):
        client.wait_ready(timeout_s=2.0, poll_s=0.5)
    assert len(api.requests) == 5  # at 0, 0.5, 1, 1.5 and 2 s


# -- the async client -------------------------------------------------------------------


def test_async_client_builds_the_same_requests_and_reads_the_same_answers() -> None:
    api = Api(embeddings([[0.5, 0.5]]), ok({"results": [{"matches": [MATCH]}]}))

    async def session() -> Any:
        async with api.async_client(token="t") as client:
            vectors = await client.embed([JPEG], timeout_ms=1000)
            matches = await client.search(vectors=vectors, k=1, same_class=True)
        return vectors, matches

    vectors, [[match]] = run(session())
    assert vectors.dtype == np.float32 and vectors.shape == (1, 2)
    assert match.id == "a/b"
    first, second = api.requests
    assert parts(first) == [("image", "0.jpg", "image/jpeg", JPEG)]
    assert first.url.params["timeout_ms"] == "1000"
    assert dict(second.url.params) == {"k": "1", "same_class": "true"}
    assert json.loads(second.content) == {"vectors": [[0.5, 0.5]]}
    assert second.headers["authorization"] == "Bearer t"


def test_async_client_retries_503_with_its_sleep_and_maps_errors() -> None:
    api = Api(
        error(503, "overloaded", "full", retry_after="3"),
        error(404, "not_found", "no item 'a/b'"),
    )

    async def session() -> None:
        client = api.async_client()
        try:
            await client.get("a/b")
        finally:
            await client.aclose()

    with pytest.raises(NotFound, match="no item 'a/b'"):
        run(session())
    assert api.sleeps == [3.0] and api.last.url.raw_path == b"/v1/items/a%2Fb"


def test_async_items_follow_cursors_and_add_splits_long_lists() -> None:
    pages = {None: {"items": [ITEM], "next": "9"}, "9": {"items": [ITEM], "next": None}}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return ok({"added": fields(request, "id")})
        return ok(pages[request.url.params.get("cursor")])

    api = Api(handler=handler)

    async def session() -> tuple[list[str], list[str]]:
        async with api.async_client() as client:
            added = await client.add([NewItem(str(i), JPEG) for i in range(65)])
            return added, [item.id async for item in client.items(limit=1)]

    added, listed = run(session())
    assert added == [str(i) for i in range(65)] and listed == ["a/b", "a/b"]
    assert [r.method for r in api.requests] == ["POST", "POST", "GET", "GET"]


def test_async_wait_ready_and_ready() -> None:
    api = Api(
        httpx.ConnectError("refused"),
        error(503, "not_ready", "loading"),
        ok({}),
        error(503, "draining", "bye"),
    )

    async def session() -> bool:
        async with api.async_client() as client:
            await client.wait_ready(timeout_s=5, poll_s=0.25)
            return await client.ready()

    assert run(session()) is False
    assert api.sleeps == [0.25, 0.25] and len(api.requests) == 4


# -- what it imports ----------------------------------------------------------------------


def test_importing_the_client_loads_no_tensorflow_twisted_klein_or_faiss() -> None:
    heavy = ("tensorflow", "keras", "twisted", "klein", "faiss", "PIL", "prometheus_client")
    probe = (
        "import sys, json, batchserve.client\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# -- the bench's uses -------------------------------------------------------------------


def test_the_overload_probe_reports_a_503_with_its_retry_after_and_no_answer_as_0() -> None:
    from bench.scenarios.overload import probe

    api = Api(error(503, "overloaded", "full", retry_after="1"), embeddings([[1.0]]))
    client = api.client(retries=Retry(attempts=1))
    assert probe(client, JPEG)[:2] == (503, True)
    assert probe(client, JPEG)[:2] == (200, False)
    refused = Api(httpx.ConnectError("refused")).client(retries=Retry(attempts=1))
    assert probe(refused, JPEG)[:2] == (0, False)


def test_a_starting_server_is_ready_only_once_readyz_says_200() -> None:
    from bench.harness.procs import answers

    assert answers(Api(ok({})).client().ready) is True
    assert answers(Api(error(503, "not_ready", "loading")).client().ready) is False
    assert (
        answers(Api(httpx.ConnectError("refused")).client(retries=Retry(attempts=1)).ready) is False
    )
    assert answers(Api(error(404, "not_found", "no route")).client().ready) is False
