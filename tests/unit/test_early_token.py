"""A request that its token does not open keeps none of its body: a JSON search, a JSON add,
a delete, /v2 inference are refused from their headers, by their handlers and as they
always were, before a byte of the body is buffered; a token that opens the route lets the
body in. Adding and deleting need the write token whatever the case of the method. Real
Twisted HTTP channels over an in-memory transport; no reactor, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.server import Site

from batchserve.http.auth import Tokens
from batchserve.http.site import BoundedRequest, make_site
from tests.unit.test_api import Harness, add_as, bearer
from tests.unit.test_oip_api import INFER, infer_json
from tests.unit.test_site import Connection

#: A body this large is held in a file by Twisted; under the harness's 200 kB limit.
LARGE = 150_000

INFER_VERSIONED = "/v2/models/fake/versions/1/infer"

Response = tuple[int, dict[str, str], Any]


def padded(body: bytes) -> bytes:
    """``body`` (JSON) padded with spaces to ``LARGE`` bytes: still the same JSON."""
    return body + b" " * (LARGE - len(body))


def search_body(h: Harness) -> bytes:
    return padded(json.dumps({"vectors": [[1.0] + [0.0] * (h.model.info.dim - 1)]}).encode())


def head(method: str, path: str, body: bytes, token: str | None = None) -> str:
    auth = f"Authorization: Bearer {token}\n" if token is not None else ""
    return (
        f"{method} {path} HTTP/1.1\nHost: x\nContent-Type: application/json\n{auth}"
        f"Content-Length: {len(body)}\n\n"
    )


def requests_of(site: Site) -> list[BoundedRequest]:
    """Make ``site`` remember every request it makes."""
    made: list[BoundedRequest] = []
    factory = site.requestFactory

    def remember(*args: Any) -> BoundedRequest:
        request = factory(*args)
        made.append(request)
        return request

    site.requestFactory = remember
    return made


def sent_in_halves(site: Site, method: str, path: str, body: bytes, token: str | None) -> Any:
    """Send a request's headers and the first half of its body: the body bytes it holds by
    then; then the rest: its response."""
    made = requests_of(site)
    connection = Connection(site)
    half = len(body) // 2
    connection.send(head(method, path, body, token), body[:half])
    [request] = made
    held = request.content.tell()
    connection.send("", body[half:])
    [response] = connection.responses()
    return held, response


@pytest.mark.parametrize(
    ("token", "status", "code"), [(None, 401, "unauthorized"), ("wrong", 403, "forbidden")]
)
def test_a_json_search_its_token_does_not_open_keeps_none_of_its_body(
    token: str | None, status: int, code: str
) -> None:
    h = Harness(tokens=Tokens(api="secret"))
    held, (got, headers, doc) = sent_in_halves(
        h.server.site, "POST", "/v1/search", search_body(h), token
    )
    assert held == 0
    assert (got, doc["error"]["code"]) == (status, code)
    if status == 401:
        assert headers["www-authenticate"] == 'Bearer realm="batchserve"'
    assert f'batchserve_requests_total{{code="{status}",route="/v1/search"}} 1.0' in (
        h.metrics.render().decode()
    )


@pytest.mark.parametrize("path", [INFER, INFER_VERSIONED])
@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong", 403)])
def test_v2_inference_its_token_does_not_open_keeps_none_of_its_body(
    path: str, token: str | None, status: int
) -> None:
    h = Harness(tokens=Tokens(api="secret"))
    held, (got, _, doc) = sent_in_halves(
        h.server.site, "POST", path, padded(infer_json([b"x"])), token
    )
    assert held == 0
    assert got == status and "token" in doc["error"]  # the protocol's error: a string
    assert h.model.batch_shapes == []


@pytest.mark.parametrize("path", ["/v1/search", INFER, INFER_VERSIONED])
def test_a_token_that_opens_the_route_lets_its_body_in(path: str) -> None:
    h = Harness(tokens=Tokens(api="r", write="w"))
    body = search_body(h) if path == "/v1/search" else padded(infer_json([b"not an image"]))
    held, (status, _, _) = sent_in_halves(h.server.site, "POST", path, body, "r")
    assert held == LARGE // 2
    assert status == (200 if path == "/v1/search" else 400)  # its handler read the body


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/items"), ("DELETE", "/v1/items/a")])
def test_a_read_token_keeps_no_body_of_an_add_or_a_delete(method: str, path: str) -> None:
    h = Harness(tokens=Tokens(api="r", write="w"))
    body = padded(json.dumps({"items": []}).encode())
    held, (status, _, doc) = sent_in_halves(h.server.site, method, path, body, "r")
    assert held == 0
    assert status == 403 and "adding or deleting" in doc["error"]["message"]


@pytest.mark.parametrize("method", ["delete", "Delete", "dElEtE"])
def test_deleting_needs_the_write_token_whatever_the_case_of_the_method(method: str) -> None:
    h = Harness(tokens=Tokens(api="r", write="w"))
    assert add_as(h, "w") == 200
    connection = Connection(h.server.site)
    connection.send(f"{method} /v1/items/a HTTP/1.1\nHost: x\nAuthorization: Bearer r\n\n")
    [(status, _, _)] = connection.responses()
    assert status == 403
    assert h.request("GET", "/v1/items/a", headers=bearer("r"))[0] == 200


#: Requests with a body, to every kind of route: queued, written, read, open, none.
ROUTES = [
    ("POST", "/v1/embed"),
    ("POST", "/v1/classify"),
    ("POST", "/v1/search"),
    ("POST", "/v1/items"),
    ("post", "/v1/items"),
    ("POST", "/v1/%69tems"),
    ("DELETE", "/v1/items/a"),
    ("GET", "/v1/index"),
    ("POST", INFER),
    ("POST", INFER_VERSIONED),
    ("POST", "/v2/models/other/infer"),
    ("GET", "/healthz"),
    ("POST", "/v1/nowhere"),
    ("PUT", "/v1/search"),
]


def answer(site: Site, method: str, path: str, token: str | None) -> tuple[int, Response]:
    body = padded(b"{}")
    held, (status, headers, doc) = sent_in_halves(site, method, path, body, token)
    kept = {k: v for k, v in headers.items() if k in ("www-authenticate", "allow")}
    return held, (status, kept, doc if status >= 400 else None)


@pytest.mark.parametrize(
    "tokens", [Tokens(api="r"), Tokens(write="w"), Tokens(api="r", write="w")], ids=repr
)
def test_each_answer_is_the_one_its_handler_gives_with_the_body_in(tokens: Tokens) -> None:
    h = Harness(tokens=tokens)
    unscreened = make_site(h.api.resource(), 200_000, False)
    for method, path in ROUTES:
        for token in (None, "wrong", "r", "w"):
            held, screened = answer(h.server.site, method, path, token)
            assert screened == answer(unscreened, method, path, token)[1], (method, path, token)
            if screened[0] in (401, 403):
                assert held == 0, (method, path, token)
