"""The Site's request handling before any handler runs: bodies over the limit, and requests
refused from their headers when the server cannot take their work; and the client its access
line names, behind a trusted proxy or not. Real Twisted HTTP channels over an in-memory
transport; no reactor, no sockets."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from batchserve.http.auth import Tokens
from batchserve.http.site import (
    BoundedRequest,
    ConnectionLimits,
    IPNetwork,
    forwarded_client,
    make_site,
)
from batchserve.serving import logs
from batchserve.testing import FakeRunner, SiteClient, encode_multipart, result_of
from tests.unit.test_api import RED, Harness

IMAGE = {"Content-Type": "image/jpeg"}


class Connection:
    """One client connection to ``site``: send raw HTTP, read back the responses."""

    def __init__(self, site: Site, peer: str = "127.0.0.1") -> None:
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
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


# -- the client an access line names ---------------------------------------------------

NGINX = "10.0.0.5"
LOOPBACK = ("127.0.0.1/32", "::1/128")


def trusting(*networks: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n) for n in networks)


def client(peer: str | None, trusted: tuple[IPNetwork, ...], **headers: str) -> str | None:
    """The client ``forwarded_client`` names for a request from ``peer`` with ``headers``
    (keyword names with ``_`` for ``-``)."""
    raw = {k.replace("_", "-").encode(): [v.encode("latin-1")] for k, v in headers.items()}
    return forwarded_client(peer, Headers(raw), trusted)


def test_behind_a_trusted_proxy_the_client_is_the_right_most_untrusted_address() -> None:
    trusted = trusting(*LOOPBACK, "10.0.0.0/24")
    # nginx appended its peer (203.0.113.7); a second proxy in 10.0.0.0/24 appended its own;
    # whatever the client wrote on the left (198.51.100.1) is never believed.
    chain = "198.51.100.1, 203.0.113.7, 10.0.0.9"
    assert client(NGINX, trusted, x_forwarded_for=chain) == "203.0.113.7"
    assert client("127.0.0.1", trusted, x_forwarded_for="203.0.113.7") == "203.0.113.7"
    assert client("::1", trusted, x_forwarded_for="2001:db8::7") == "2001:db8::7"
    # Several header lines are one list, in order.
    headers = Headers({b"x-forwarded-for": [b"198.51.100.1", b"203.0.113.7, 10.0.0.9"]})
    assert forwarded_client(NGINX, headers, trusted) == "203.0.113.7"
    # Every hop trusted: the left-most is the client.
    assert client(NGINX, trusted, x_forwarded_for="10.0.0.8, 127.0.0.1") == "10.0.0.8"
    # Ports, brackets and IPv4-mapped addresses, as some proxies write them.
    assert client(NGINX, trusted, x_forwarded_for="203.0.113.7:5123") == "203.0.113.7"
    assert client(NGINX, trusted, x_forwarded_for="[2001:db8::7]:443") == "2001:db8::7"
    assert client("::ffff:10.0.0.5", trusted, x_forwarded_for="::ffff:10.0.0.1") == "10.0.0.1"


def test_an_untrusted_peers_forwarding_headers_are_ignored() -> None:
    spoofed = {"x_forwarded_for": "127.0.0.1", "forwarded": "for=127.0.0.1"}
    assert client("203.0.113.7", trusting(*LOOPBACK), **spoofed) == "203.0.113.7"
    assert client("2001:db8::7", trusting(*LOOPBACK), **spoofed) == "2001:db8::7"
    # No proxy trusted: every peer is the client, as before there were proxies.
    assert client("127.0.0.1", (), x_forwarded_for="203.0.113.7") == "127.0.0.1"
    # A direct request from a trusted address, without a header: the peer.
    assert client("127.0.0.1", trusting(*LOOPBACK)) == "127.0.0.1"
    assert client(None, trusting(*LOOPBACK), x_forwarded_for="203.0.113.7") is None


def test_forwarded_names_quoted_ipv6_and_obfuscated_identifiers() -> None:
    trusted = trusting(*LOOPBACK, "10.0.0.0/24")

    def named(forwarded: str) -> str | None:
        return client(NGINX, trusted, forwarded=forwarded)

    assert named("for=203.0.113.7") == "203.0.113.7"
    assert named('For="[2001:db8:cafe::17]:4711"') == "2001:db8:cafe::17"
    assert named('for=198.51.100.1, for="203.0.113.7:80";proto=https;by=10.0.0.5') == (
        "203.0.113.7"
    )
    assert named('for="198.51.100.1";by="a,b;c", for=10.0.0.9') == "198.51.100.1"
    assert named('by="\\"a,b\\"";for=_x, for=10.0.0.9') == "_x"  # escaped quotes
    # RFC 7239's names for a client a proxy does not disclose: logged as named.
    assert named("for=_hidden, for=10.0.0.9") == "_hidden"
    assert named('for="_gazonk:_p0rt"') == "_gazonk"
    assert named("for=unknown") == "unknown"
    # X-Forwarded-For first: the header nginx appends to, whatever a client wrote here.
    both = {"x_forwarded_for": "203.0.113.7", "forwarded": "for=198.51.100.1"}
    assert client(NGINX, trusted, **both) == "203.0.113.7"


def test_a_proxy_is_trusted_by_its_network_or_by_star() -> None:
    assert client("10.1.2.3", trusting("10.0.0.0/8"), x_forwarded_for="1.2.3.4") == "1.2.3.4"
    assert client("11.1.2.3", trusting("10.0.0.0/8"), x_forwarded_for="1.2.3.4") == "11.1.2.3"
    assert client("fd00::5", trusting("fd00::/8"), x_forwarded_for="1.2.3.4") == "1.2.3.4"
    every = trusting("0.0.0.0/0", "::/0")  # what forwarded_allow_ips "*" trusts
    for peer in ("203.0.113.7", "2001:db8::7"):
        assert client(peer, every, x_forwarded_for="198.51.100.1, 10.0.0.9") == "198.51.100.1"
        assert client(peer, every, forwarded="for=_hidden, for=10.0.0.9") == "_hidden"


@pytest.mark.parametrize(
    "headers",
    [
        {"x_forwarded_for": "not-an-address"},
        {"x_forwarded_for": "203.0.113.7, <script>"},
        {"x_forwarded_for": "203.0.113.7:http"},
        {"x_forwarded_for": " , ,"},
        {"x_forwarded_for": "\xff\xfe"},
        {"forwarded": "for"},
        {"forwarded": "for=[2001:db8::1]"},  # IPv6 must be quoted
        {"forwarded": 'for="203.0.113.7'},  # unterminated
        {"forwarded": "proto=https"},  # names no client
        {"forwarded": "for=203.0.113.7;;==, for=10.0.0.9 junk"},
        {"forwarded": '"\\' * 5000},  # no search takes quadratic time
    ],
)
def test_a_forwarding_header_that_cannot_name_the_client_leaves_the_peer(
    headers: dict[str, str],
) -> None:
    assert client(NGINX, trusting("10.0.0.0/24"), **headers) == NGINX


def test_the_access_line_names_the_client_a_trusted_proxy_forwarded_for() -> None:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        site = make_site(Harness().api.resource(), 200_000, True, None, trusting("10.0.0.0/24"))
        forwarded = "GET /nowhere HTTP/1.1\nHost: x\nX-Forwarded-For: 203.0.113.7\n\n"
        for peer in (NGINX, "198.51.100.1"):
            Connection(site, peer).send(forwarded)
        Connection(site, NGINX).send("GET /nowhere HTTP/1.1\nHost: x\n\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if e.get("log_namespace") == logs.ACCESS_NAMESPACE]
    assert [line["client"] for line in lines] == ["203.0.113.7", "198.51.100.1", NGINX]


# -- slow and surplus connections ----------------------------------------------------------


def test_headers_that_trickle_in_are_cut_off_header_timeout_s_after_the_first_byte() -> None:
    h = Harness()  # the server's defaults: header_timeout_s 10, on the server's clock
    connection = Connection(h.server.site)
    connection.send("GET /healthz HTTP/1.1\nHost: localhost\n")
    for _ in range(9):  # a header a second: each one restarts Twisted's idle timer
        h.clock.advance(1.0)
        connection.send("X-Slow: 1\n")
    h.clock.advance(0.9)  # 9.9 s since the first byte
    assert connection.transport.value() == b"" and not connection.transport.disconnecting
    h.clock.advance(0.2)
    [(status, headers, doc)] = connection.responses()
    assert status == 408 and doc["error"]["code"] == "request_timeout"
    assert "headers did not arrive within 10 s" in doc["error"]["message"]
    assert headers["connection"] == "close" and headers["server"] == "batchserve"
    assert connection.transport.disconnecting
    connection.send("\n")  # the blank line, too late: dropped, never answered
    assert connection.transport.value() == b""


def test_a_body_that_trickles_in_is_cut_off_body_timeout_s_after_the_first_byte() -> None:
    h = Harness()
    connection = Connection(h.server.site)
    connection.send(post("/v1/embed", b"x" * 1000).replace("Host: x", "Host: localhost"))
    for _ in range(59):  # ten bytes a second: 1000 would take 100 s
        h.clock.advance(1.0)
        connection.send("", b"x" * 10)
    h.clock.advance(0.9)
    assert connection.transport.value() == b"" and not connection.transport.disconnecting
    h.clock.advance(0.2)
    [(status, _, doc)] = connection.responses()
    assert status == 408 and "body did not arrive within 60 s" in doc["error"]["message"]
    assert connection.transport.disconnecting
    assert 'route="/v1/embed"' not in h.metrics.render().decode()  # never reached its handler


def test_each_request_on_a_connection_has_its_own_deadline_and_idling_has_its_own() -> None:
    h = Harness()
    connection = Connection(h.server.site)
    for _ in range(3):  # 3 requests, 40 s apart: 80 s on one connection, each in time
        connection.send("GET /healthz HTTP/1.1\nHost: localhost\n\n")
        assert [r[0] for r in connection.responses()] == [200]
        h.clock.advance(40.0)
    connection.send("GET /healthz HTTP/1.1\n")
    h.clock.advance(9.9)
    assert not connection.transport.disconnecting
    h.clock.advance(0.2)
    assert [r[0] for r in connection.responses()] == [408]

    idle = Connection(h.server.site)  # idle_timeout_s 75: Twisted's timer, not its 12 h
    h.clock.advance(74.9)
    assert not idle.transport.disconnecting
    h.clock.advance(0.2)
    assert idle.transport.disconnecting and idle.transport.value() == b""


def test_a_request_being_answered_is_never_cut_off_by_the_read_deadlines() -> None:
    h = Harness(hold=True, timeout_s=120.0)
    connection = Connection(h.server.site)
    connection.send(post("/v1/embed", RED).replace("Host: x", "Host: localhost"), RED)
    h.clock.advance(100.0)  # past the header and body deadlines, and the idle timer
    assert connection.transport.value() == b"" and not connection.transport.disconnecting
    h.runner.release_all()
    assert [r[0] for r in connection.responses()] == [200]
    assert not connection.transport.disconnecting


def limited_site(max_connections: int) -> Site:
    limits = ConnectionLimits(
        header_timeout_s=10.0,
        body_timeout_s=60.0,
        idle_timeout_s=75.0,
        max_connections=max_connections,
    )
    return make_site(Harness().api.resource(), 200_000, False, limits=limits, clock=Clock())


def test_a_connection_past_max_connections_is_answered_503_and_closed() -> None:
    site = limited_site(max_connections=2)
    first, second = Connection(site), Connection(site)
    over = Connection(site)
    [(status, headers, doc)] = over.responses()
    assert status == 503 and doc["error"]["code"] == "overloaded"
    assert headers["retry-after"] == "1" and over.transport.disconnecting
    over.send("GET /healthz HTTP/1.1\nHost: localhost\n\n")  # never read
    assert over.transport.value() == b""
    for connection in (first, second):
        assert not connection.transport.disconnecting
    over.channel.connectionLost(Failure(ConnectionDone()))
    first.channel.connectionLost(Failure(ConnectionDone()))
    after = Connection(site)  # one closed: room for one more
    after.send("GET /healthz HTTP/1.1\nHost: localhost\n\n")
    assert [r[0] for r in after.responses()] == [200]
    assert [r[0] for r in Connection(site).responses()] == [503]


def test_a_request_admitted_from_its_headers_holds_its_room_until_its_handler_runs() -> None:
    h = Harness(runner=FakeRunner(), max_queue=1)
    h.service.embed(lambda: [RED])  # runs: the queue is empty again, with room for one
    site = make_site(h.api.resource(), 200_000, False, h.api.refuse_early)
    first, second = Connection(site), Connection(site)
    first.send(post("/v1/embed", RED), RED[:10])  # admitted; its body still coming
    assert h.service.reading == 1
    second.send(post("/v1/embed", RED), RED)  # no room beside the first: refused at once
    [(status, _, _)] = second.responses()
    assert status == 503
    first.send("", RED[10:])  # its handler runs and queues its image
    assert first.responses() == [] and h.batcher.queued == 1 and h.service.reading == 0


def test_a_client_that_hangs_up_before_its_body_gives_its_room_back() -> None:
    h = Harness(runner=FakeRunner(), max_queue=1)
    h.service.embed(lambda: [RED])
    site = make_site(h.api.resource(), 200_000, False, h.api.refuse_early)
    gone = Connection(site)
    gone.send(post("/v1/embed", RED), RED[:10])
    assert h.service.reading == 1
    gone.channel.connectionLost(Failure(ConnectionDone("the client hung up")))
    assert h.service.reading == 0
    later = Connection(site)
    later.send(post("/v1/embed", RED), RED)
    assert later.responses() == [] and h.batcher.queued == 1  # taken, not refused


def paced_harness() -> tuple[Harness, Site]:
    """A full queue, with refusals paced at the floor rate: 20 a second, after a burst of
    a second's worth (21: the one due now and the 20 due within the second)."""
    h, site, _made = full_harness(refusals_per_image=0.001)
    return h, site


def test_refusals_beyond_the_paced_rate_are_answered_in_their_turn() -> None:
    h, site = paced_harness()
    burst = [Connection(site) for _ in range(21)]
    for connection in burst:
        connection.send(post("/v1/embed", RED), RED)
        assert [r[0] for r in connection.responses()] == [503]  # at once
    held = Connection(site)
    held.send(post("/v1/embed", RED), RED)
    assert held.responses() == []  # its turn is 1/20 s away
    h.clock.advance(0.06)
    [(status, headers, doc)] = held.responses()
    assert (status, doc["error"]["code"]) == (503, "overloaded") and "retry-after" in headers
    assert "batchserve_refusals_held_total 1.0" in h.metrics.render().decode()


def test_a_held_refusal_whose_client_hangs_up_is_never_written() -> None:
    h, site = paced_harness()
    for _ in range(21):
        Connection(site).send(post("/v1/embed", RED), RED)
    held = Connection(site)
    held.send(post("/v1/embed", RED), RED)
    held.channel.connectionLost(Failure(ConnectionDone("the client hung up")))
    assert not [c for c in h.clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "write"]
    h.clock.advance(1.0)
    assert held.transport.value() == b""


def test_a_connection_is_asked_once_whether_it_is_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []
    original = HTTPChannel.isSecure

    def counting(channel: HTTPChannel) -> bool:
        asked.append(True)
        return original(channel)

    monkeypatch.setattr(HTTPChannel, "isSecure", counting)
    _, site, _made = full_harness()
    connection = Connection(site)
    for _ in range(3):
        connection.send("GET /healthz HTTP/1.1\nHost: x\n\n")  # Klein asks of each
    assert [r[0] for r in connection.responses()] == [200, 200, 200]
    assert len(asked) == 1
