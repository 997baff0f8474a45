"""The Site's request handling before any handler runs: bodies over the limit, and requests
refused from their headers when the server cannot take their work. Real Twisted HTTP
channels over an in-memory transport; no reactor, no sockets."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from batchserve.http.auth import Tokens
from batchserve.http.site import BoundedRequest, make_site
from batchserve.testing import FakeRunner, SiteClient, encode_multipart, result_of
from tests.unit.test_api import RED, Harness

IMAGE = {"Content-Type": "image/jpeg"}


class Connection:
    """One client connection to ``site``: send raw HTTP, read back the responses."""

    def __init__(self, site: Site) -> None:
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, head: str, body: bytes = b"") -> None:
        self.channel.dataReceived(head.replace("\n", "\r\n").encode() + body)

    def responses(self) -> list[tuple[int, dict[str, str], Any]]:
        """Every response sent so far, parsed; clears the transport."""
        raw = self.transport.value()
        self.transport.clear()
        parsed = []
        while raw:
            head, _, rest = raw.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            headers = {k.lower(): v for k, v in headers.items()}
            length = int(headers["content-length"])
            parsed.append((int(lines[0].split()[1]), headers, json.loads(rest[:length])))
            raw = rest[length:]
        return parsed


def post(path: str, body: bytes, content_type: str = "image/jpeg", extra: str = "") -> str:
    return (
        f"POST {path} HTTP/1.1\nHost: x\nContent-Type: {content_type}\n{extra}"
        f"Content-Length: {len(body)}\n\n"
    )


def full_harness(**kwargs: Any) -> tuple[Harness, Site, list[BoundedRequest]]:
    """A harness whose queue (one image) is full, and a Site like the server's that
    remembers the requests it made, each with ``buffered``: the body bytes it held when
    it was processed."""
    h = Harness(runner=FakeRunner(), max_queue=1, **kwargs)
    h.service.embed(lambda: [RED])  # runs: the FakeRunner never finishes it
    h.service.embed(lambda: [RED])  # waits in the queue
    assert h.batcher.queued == 1
    site = make_site(h.api.resource(), 200_000, False, h.api.refuse_early)
    return h, site, recorded_requests(site)


def recorded_requests(site: Site) -> list[BoundedRequest]:
    """Make ``site`` remember every request it makes, each with ``buffered``: the body bytes
    it held when it was processed."""
    made: list[BoundedRequest] = []
    factory = site.requestFactory

    def remember(*args: Any) -> BoundedRequest:
        request = factory(*args)
        made.append(request)
        process = request.process

        def recording() -> None:
            held = request.content.getvalue() if request.content is not None else b""
            request.buffered = held  # type: ignore[attr-defined]
            process()

        request.process = recording  # type: ignore[method-assign]
        return request

    site.requestFactory = remember
    return made


def test_a_full_queue_refuses_image_work_from_the_headers_without_buffering_the_body() -> None:
    h, site, made = full_harness()
    connection = Connection(site)
    connection.send(post("/v1/embed", RED), RED)
    [(status, headers, doc)] = connection.responses()
    assert status == 503 and doc["error"]["code"] == "overloaded"
    assert "queue full" in doc["error"]["message"]
    assert headers["retry-after"] == str(h.batcher.retry_after_s())
    assert headers["content-type"] == "application/json" and "date" in headers
    [request] = made
    assert request.early_answer is not None
    assert request.buffered == b""  # type: ignore[attr-defined]
    text = h.metrics.render().decode()
    assert 'batchserve_requests_total{code="503",route="/v1/embed"} 1.0' in text
    assert 'batchserve_rejected_total{reason="queue_full"} 1.0' in text


def test_the_connection_stays_usable_after_an_early_refusal() -> None:
    _, site, made = full_harness()
    connection = Connection(site)
    connection.send(post("/v1/classify?k=2", RED), RED)
    connection.send(post("/v1/embed", RED), RED)
    connection.send("GET /healthz HTTP/1.1\nHost: x\n\n")
    assert [r[0] for r in connection.responses()] == [503, 503, 200]
    assert len(made) == 3 and not connection.transport.disconnecting


def test_every_image_route_and_encoding_is_refused_early() -> None:
    multipart, multipart_type = encode_multipart([("image", "a.jpg", RED)])
    for path, body, content_type in [
        ("/v1/embed", RED, "image/png"),
        ("/v1/embed", RED, "application/octet-stream"),
        ("/v1/classify", multipart, multipart_type),
        ("/v1/search?k=3", RED, "image/jpeg"),
        ("/v1/items?id=a", RED, "image/jpeg"),
    ]:
        _, site, made = full_harness()
        connection = Connection(site)
        connection.send(post(path, body, content_type), body)
        [(status, _, doc)] = connection.responses()
        assert (status, doc["error"]["code"]) == (503, "overloaded"), path
        assert made[0].early_answer is not None, path


def test_what_needs_no_model_goes_to_its_handler() -> None:
    h, site, made = full_harness(tokens=Tokens(api="secret"))
    connection = Connection(site)
    auth = "Authorization: Bearer secret\n"
    vector = json.dumps({"vectors": [[1.0] + [0.0] * (h.model.info.dim - 1)], "k": 1}).encode()
    connection.send(post("/v1/search", vector, "application/json", auth), vector)
    connection.send("GET /v1/index HTTP/1.1\nHost: x\n" + auth + "\n")
    statuses = [r[0] for r in connection.responses()]
    assert statuses == [200, 200]
    assert all(request.early_answer is None for request in made)


def test_image_work_without_a_valid_token_is_refused_from_its_headers() -> None:
    _h, site, made = full_harness(tokens=Tokens(api="secret"))
    connection = Connection(site)
    connection.send(post("/v1/embed", RED), RED)  # no token
    connection.send(post("/v1/embed", RED, extra="Authorization: Bearer wrong\n"), RED)
    answers = connection.responses()
    assert [(status, doc["error"]["code"]) for status, _h2, doc in answers] == [
        (401, "unauthorized"),
        (403, "forbidden"),
    ]
    assert answers[0][1]["www-authenticate"] == 'Bearer realm="batchserve"'
    assert all(request.early_answer is not None for request in made)
    assert all(request.buffered == b"" for request in made)  # no body byte kept


def test_nothing_is_refused_early_while_there_is_room() -> None:
    h = Harness()
    site = make_site(h.api.resource(), 200_000, False, h.api.refuse_early)
    connection = Connection(site)
    connection.send(post("/v1/embed", RED), RED)
    [(status, _, doc)] = connection.responses()
    assert status == 200 and len(doc["results"]) == 1


def test_a_loading_model_is_refused_early_with_retry_after() -> None:
    h = Harness(ready=False)
    site = make_site(h.api.resource(), 200_000, False, h.api.refuse_early)
    connection = Connection(site)
    connection.send(post("/v1/embed", RED), RED)
    [(status, headers, doc)] = connection.responses()
    assert status == 503 and doc["error"]["code"] == "not_ready" and "retry-after" in headers


def test_a_body_over_the_limit_is_not_buffered_and_is_not_refused_early() -> None:
    calls: list[bytes] = []

    def refuse(request: Any, method: bytes, path: bytes) -> None:
        calls.append(path)

    h = Harness()
    site = make_site(h.api.resource(), 1000, False, refuse)
    made: list[Any] = recorded_requests(site)
    connection = Connection(site)
    body = b"x" * 5000
    connection.send(post("/v1/embed", body), body)
    [(status, _, doc)] = connection.responses()
    assert status == 413 and "limit" in doc["error"]["message"]
    assert made[0].state.body_over_limit and made[0].buffered == b""  # none of the 5000 bytes held
    assert calls == []
    connection.send(post("/v1/embed", RED[:500]), RED[:500])
    assert calls == [b"/v1/embed"]


def test_a_refused_request_is_answered_like_its_handler_would() -> None:
    h, site, _ = full_harness()
    # The same API on a Site without early refusal: the handler answers.
    handler_site = make_site(h.api.resource(), 200_000, False)
    response = result_of(SiteClient(handler_site).request("POST", "/v1/embed", RED, IMAGE))
    connection = Connection(site)
    connection.send(post("/v1/embed", RED), RED)
    [(status, headers, early)] = connection.responses()
    assert (status, early) == (response.code, response.json())
    assert headers["retry-after"] == response.headers["retry-after"]
