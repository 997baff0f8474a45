"""Graceful shutdown's bookkeeping: requests in flight, refusal once draining, the bound;
the connections a drain closes at once, and those whose request it takes and answers."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from batchserve.errors import NotReady
from batchserve.http.drain import Connections, InFlight
from batchserve.http.site import make_site


def fired(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_drain_fires_once_the_last_request_is_answered() -> None:
    clock, flight = Clock(), InFlight()
    flight.enter()
    flight.enter()
    done = fired(flight.drain(30, clock))
    flight.leave()
    assert done == []
    flight.leave()
    assert done == [True] and clock.getDelayedCalls() == []  # the timer is cancelled


def test_drain_gives_up_after_its_timeout() -> None:
    clock, flight = Clock(), InFlight()
    flight.enter()
    done = fired(flight.drain(5, clock))
    clock.advance(4.9)
    assert done == []
    clock.advance(0.1)
    assert done == [False]
    flight.leave()  # answered late: nothing fires twice
    assert done == [False]


def test_nothing_in_flight_drains_at_once_and_new_requests_are_refused() -> None:
    flight = InFlight()
    assert fired(flight.drain(5, Clock())) == [True]
    with pytest.raises(NotReady) as refused:
        flight.enter()
    assert refused.value.retry_after_s == 1 and flight.count == 0


# -- connections: what a drain closes, what it takes -------------------------------------


class Pages(Resource):
    """/now answers at once; /held waits until the test answers it."""

    isLeaf = True  # noqa: N815 (Twisted API)

    def __init__(self, flight: InFlight) -> None:
        super().__init__()
        self.flight = flight
        self.held: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        try:
            self.flight.enter(request)  # what the API's responder does first
        except NotReady:
            request.setResponseCode(503)
            return b"refused"
        self.flight.leave()
        if request.path == b"/held":
            self.held.append(request)
            return NOT_DONE_YET
        return b"now"


class Peer:
    """One client connection to ``connections``, in memory."""

    def __init__(self, connections: Connections) -> None:
        self.protocol = connections.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        return self.transport.value()

    def hang_up(self) -> None:
        """What the reactor does once a closed connection is gone."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


def serving() -> tuple[InFlight, Pages, Connections]:
    flight = InFlight()
    pages = Pages(flight)
    return flight, pages, Connections(make_site(pages, max_body_bytes=1024, access_log=False))


def test_a_drain_closes_idle_keep_alive_connections_at_once() -> None:
    flight, _, connections = serving()
    idle = Peer(connections)
    idle.send(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.sent().startswith(b"HTTP/1.1 200") and not idle.transport.disconnecting
    never_used = Peer(connections)

    done = fired(flight.drain(30, Clock(), connections))
    assert idle.transport.disconnecting and never_used.transport.disconnecting
    assert done == []  # until they are gone
    idle.hang_up()
    never_used.hang_up()
    assert done == [True]


def test_a_request_in_progress_is_answered_with_connection_close_then_its_connection_closes() -> (
    None
):
    clock = Clock()
    flight, pages, connections = serving()
    busy = Peer(connections)
    busy.send(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")

    done = fired(flight.drain(30, clock, connections))
    assert not busy.transport.disconnecting and done == []
    pages.held[0].write(b"late")
    pages.held[0].finish()
    assert busy.sent().startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in busy.sent() and busy.transport.disconnecting
    busy.hang_up()
    assert done == [True] and clock.getDelayedCalls() == []


def test_a_request_still_arriving_when_the_drain_starts_is_taken_not_refused() -> None:
    flight, _, connections = serving()
    headers_only = Peer(connections)
    headers_only.send(b"GET /now HTTP/1.1\r\nHost: x\r\n")  # its blank line not yet in

    done = fired(flight.drain(30, Clock(), connections))
    assert not headers_only.transport.disconnecting
    headers_only.send(b"\r\n")
    answer = headers_only.sent()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"now")
    assert b"Connection: close" in answer and headers_only.transport.disconnecting
    headers_only.hang_up()
    assert done == [True]


def test_a_request_on_a_connection_the_drain_did_not_take_is_refused() -> None:
    flight, _, connections = serving()
    flight.drain(30, Clock(), connections)
    late = Peer(connections)  # as a client that pipelines its next request would be
    late.send(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
    assert late.sent().startswith(b"HTTP/1.1 503") and late.sent().endswith(b"refused")
    assert flight.count == 0


def test_drain_gives_up_on_a_connection_still_open_after_its_timeout() -> None:
    clock = Clock()
    flight, _, connections = serving()
    slow = Peer(connections)
    slow.send(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    done = fired(flight.drain(5, clock, connections))
    clock.advance(4.9)
    assert done == []
    clock.advance(0.1)
    assert done == [False]
