"""Requests and connections in flight, for a graceful shutdown behind a load balancer.

On SIGTERM the server drains (``InFlight.drain``), all in one turn of the reactor: /readyz
fails; the API stops listening (``Server.stop``: a new connection is refused, which nginx
retries on another replica); every connection with no request in progress is closed (a
request nginx was sending on one meets a closed connection, which it retries too); every
request already on a connection is taken: answered with ``Connection: close``, after which
its connection closes. The drain fires once the requests taken are answered and their
connections closed, or when the time is up. A request that reaches a handler on a connection
the drain did not take (a client that pipelines, a test's in-memory channel) is refused: 503
with ``Retry-After``, and its connection closes.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakSet

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from batchserve.errors import NotReady


def close_after_response(request: IRequest) -> None:
    """Answer, then close the connection (a client should reconnect to another server)."""
    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


class Connections(WrappingFactory):
    """What the API listens with: ``site``'s factory, keeping its open connections (each an
    HTTP channel) so that a drain can close them."""

    noisy = False

    def __init__(self, site: Site) -> None:
        # twisted.protocols.policies is not annotated.
        super().__init__(site)  # type: ignore[no-untyped-call]
        self._all_closed: list[Deferred[None]] = []

    def close_idle(self) -> WeakSet[IRequest]:
        """Close every connection with no request in progress, now; the requests in progress
        on the others (their headers or body still coming in, or their handler running) are
        answered with ``Connection: close``, and each connection closes once they are.
        Returns those requests: the ones the server took."""
        taken: WeakSet[IRequest] = WeakSet()
        for wrapper in list(self.protocols):
            channel = wrapper.wrappedProtocol
            assert isinstance(channel, HTTPChannel), "make_site's protocol is an HTTPChannel"
            if not channel.requests:
                self._close(wrapper)
                continue
            for request in channel.requests:
                taken.add(request)
                # A request whose headers are still coming in has its channel's
                # persistence decided again when they are in; the header stays, and the
                # connection is closed below once the request is answered.
                close_after_response(request)
                finished: Deferred[None] = request.notifyFinish()
                # Answered, or its client gone (an errback): either way it is done.
                finished.addBoth(self._close_if_idle, wrapper, channel)
        return taken

    def _close_if_idle(self, _: object, wrapper: ProtocolWrapper, channel: HTTPChannel) -> None:
        if wrapper in self.protocols and not channel.requests:
            self._close(wrapper)

    @staticmethod
    def _close(wrapper: ProtocolWrapper) -> None:
        """Close a connection once what was written to it is sent (a FIN: a request the
        client sends from now on meets a reset)."""
        assert wrapper.transport is not None, "a connection in the table is connected"
        wrapper.transport.loseConnection()

    def all_closed(self) -> Deferred[None]:
        """Fires once no connection is open."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        return d

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802 (Twisted API)
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        if not self.protocols:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)


class InFlight:
    """The requests being answered (``count``), and whether the server drains."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self._taken: WeakSet[IRequest] = WeakSet()
        self._idle: list[Deferred[None]] = []

    def enter(self, request: IRequest | None = None) -> None:
        """Count one more request; once draining, only one the drain took (else
        NotReady)."""
        if self.closing and (request is None or request not in self._taken):
            raise NotReady("the server is shutting down", retry_after_s=1)
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def drain(
        self, timeout_s: float, clock: IReactorTime, connections: Connections | None = None
    ) -> Deferred[bool]:
        """Fail /readyz and refuse new requests from now on; close ``connections`` that are
        idle and take the requests on the others (``Connections.close_idle``). Fires True
        once none is in flight and every connection is closed, or False after
        ``timeout_s`` with some still open."""
        self.closing = True
        waits: list[Deferred[Any]] = [self._none_in_flight()]
        if connections is not None:
            self._taken = connections.close_idle()
            waits.append(connections.all_closed())
        done: Deferred[bool] = Deferred()

        def answered(_: object) -> None:
            if not done.called:
                done.callback(True)

        gatherResults(waits).addCallback(answered)
        if done.called:
            return done

        def give_up() -> None:
            if not done.called:
                done.callback(False)

        timer = clock.callLater(timeout_s, give_up)

        def stop_timer(all_answered: bool) -> bool:
            if timer.active():
                timer.cancel()
            return all_answered

        return done.addCallback(stop_timer)

    def _none_in_flight(self) -> Deferred[None]:
        if self.count == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
