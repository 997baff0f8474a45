"""The Twisted Site that serves the API: request bodies bounded, requests refused from their
headers when their work cannot be taken or when a browser's page may not send them, slow
and surplus connections closed, multipart left to the API, access log on or off.

A request is judged twice before its handler runs, both times from its headers alone, so
that what will be refused is never buffered nor parsed: a ``Content-Length`` over the limit
(answered 413 by the handler), and then, unless the site's ``BrowserGuard`` (http/auth.py;
only while no token is set) refuses it, ``refuse_early(request, method, path)``, which may
return how to answer the request at once, or mark its body unread (``body_unread``) when
its token does not open it, for its handler to refuse from its headers: a client without a
token never makes the server hold a body. Under overload most requests are refusals; this
keeps their cost to reading the bytes off the socket, not routing, parsing and
JSON-encoding them.

A connection may not hold the server by sending slowly or not at all (``ConnectionLimits``):
a request's headers must be in within ``header_timeout_s`` of its first byte and all of it
within ``body_timeout_s`` (a deadline, not restarted by each byte as Twisted's idle timer
is), else 408 and the connection closes; between requests a connection may idle for
``idle_timeout_s`` (Twisted's own timer); past ``max_connections`` open at once, a new one
is answered 503 and closed. Responses name the server ``batchserve``, with no version.

The access line names the client: the TCP peer, or, when the peer is a trusted proxy (nginx
in front of the replicas), the client its forwarding header names (``forwarded_client``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from batchserve.http.auth import BrowserGuard, Refusal
from batchserve.http.bodies import RequestLimits
from batchserve.http.wire import error_body
from batchserve.serving import logs
from batchserve.serving.service import Call

log = Logger(namespace="batchserve")

#: Every response's Server header: the software, not its version (which would tell a
#: scanner which known flaws to try); the version is in the start-up log line.
SERVER = b"batchserve"

#: Reason phrases Twisted does not know.
_REASONS = {421: b"Misdirected Request"}

#: Writes a whole response to ``request`` and finishes it.
EarlyAnswer = Callable[[Request], None]

#: Called once a request's headers are in, before its body: how to answer it at once, or
#: None to let it through to its handler.
RefuseEarly = Callable[[Request, bytes, bytes], EarlyAnswer | None]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class RequestState:
    """What the server learns of one request as it goes, for its access line: written by
    the site (its id, when it started, whether its body was over the limit) and by the API
    (the route that answered, what it ran, whether it was admitted from its headers)."""

    #: The client's X-Request-Id, or one made for it; returned in the response's header.
    request_id: str = ""
    #: When the request was made (``time.monotonic()``, seconds).
    started_s: float = 0.0
    body_over_limit: bool = False
    #: The route that answered, and what it ran (its service Call: images, batch).
    route: str | None = None
    call: Call | None = None
    #: Its token and room were checked from its headers (see ``refuse_early``).
    admitted_early: bool = False
    #: It holds room in the queue, from its headers until its handler runs.
    holds_room: bool = False
    #: Its body is dropped as it arrives: its handler refuses it from its headers.
    body_unread: bool = False


def state_of(request: IRequest) -> RequestState:
    """The state of a request this site made; a request made elsewhere (a test's stub)
    keeps none, so it gets a fresh record whose writes go nowhere."""
    return request.state if isinstance(request, BoundedRequest) else RequestState()


def _let_through(request: Request, method: bytes, path: bytes) -> EarlyAnswer | None:
    return None


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may take to send a request, and how many may be open at once:
    what keeps clients that send slowly, or never, from holding the server (slowloris)."""

    #: From a request's first byte to the end of its headers, seconds.
    header_timeout_s: float
    #: From a request's first byte to the end of its body, seconds.
    body_timeout_s: float
    #: Longest wait for the next request on an open connection, seconds (Twisted's idle
    #: timer, which each byte received restarts).
    idle_timeout_s: float
    #: Connections open at once; a new one past this is answered 503 and closed.
    max_connections: int


def raw_answer(status: int, reason: bytes, code: str, message: str) -> bytes:
    """A whole response, written to a connection with no request to answer through (one
    whose request never arrived in time, or one over the limit): a JSON error, then the
    connection closes."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Server: " + SERVER,
        b"Date: " + datetimeToString(),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    if status == 503:
        head.append(b"Retry-After: 1")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class OpenConnections:
    """How many connections a site has open, against its limit."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.count = 0
        self._refusing = False

    def opened(self) -> bool:
        """Count a new connection; whether it is within the limit (if not, it is counted
        until it closes all the same). The first refusal after a connection was let in is
        logged, not each one: a flood would flood the log."""
        self.count += 1
        if self.limit is None or self.count <= self.limit:
            self._refusing = False
            return True
        if not self._refusing:
            log.warn(
                "{n} connections open, over --max-connections {limit}: new ones get 503",
                n=self.count,
                limit=self.limit,
            )
            self._refusing = True
        return False

    def closed(self) -> None:
        self.count -= 1


class RequestLineChannel(HTTPChannel):
    """An HTTPChannel that keeps the request line of the request whose headers it is
    reading, so that the request can be judged from its method and path once its headers
    are in, before its body (Twisted sets ``Request.method`` and ``uri`` only after it); and
    that holds each request it reads to its ``ConnectionLimits`` (set by the site that
    builds it; none: Twisted's idle timer alone)."""

    request_line = b""
    _awaiting_request_line = True
    limits: ConnectionLimits | None = None
    connections: OpenConnections | None = None
    #: The site's clock (Twisted's ``callLater`` on the channel comes from it too).
    clock: IReactorTime | None = None
    #: A request's headers or body are being read, and must be in by this call.
    _deadline: IDelayedCall | None = None
    _started_s = 0.0
    #: Between a request's last byte and its answer: no deadline runs.
    _answering = False
    _counted = False
    _closing = False
    _secure: bool | None = None

    def isSecure(self) -> bool:  # noqa: N802 (Twisted API)
        # Asked of every request (Klein, the guard); Twisted's answer adapts the transport
        # through the connection's wrapper each time, ~0.1 ms: a quarter of the reactor's
        # time in a flood. A connection is TLS or not for its whole life.
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        super().connectionMade()
        if self.connections is None:
            return
        self._counted = True
        if not self.connections.opened():
            self._close_with(
                raw_answer(
                    503,
                    b"Service Unavailable",
                    "overloaded",
                    "too many connections are open to this server; retry shortly",
                )
            )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self._closing:
            return
        if self._deadline is None and not self._answering and self.limits is not None:
            # The first byte of a request (or of bytes sent early, replayed once the request
            # before them is answered): its headers must be in within header_timeout_s.
            assert self.clock is not None, "the site that sets limits sets its clock"
            self._started_s = self.clock.seconds()
            limit_s = self.limits.header_timeout_s
            self._deadline = self.clock.callLater(limit_s, self._too_slow, "headers", limit_s)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted API)
        if self._awaiting_request_line and line:
            self.request_line = line
            self._awaiting_request_line = False
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:  # noqa: N802 (Twisted API)
        self._awaiting_request_line = True  # the next line starts the next request
        if self._deadline is not None and self.limits is not None and self.clock is not None:
            # The body's deadline counts from the request's first byte too.
            self._deadline.cancel()
            left_s = self._started_s + self.limits.body_timeout_s - self.clock.seconds()
            self._deadline = self.clock.callLater(
                max(0.0, left_s), self._too_slow, "body", self.limits.body_timeout_s
            )
        super().allHeadersReceived()

    def allContentReceived(self) -> None:  # noqa: N802 (Twisted API)
        # Before Twisted's: it may answer the request at once and read the next one.
        self._stop_deadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:  # noqa: N802 (Twisted API)
        self._answering = False  # bytes of the next request, replayed now, start its clock
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._stop_deadline()
        if self._counted and self.connections is not None:
            self._counted = False
            self.connections.closed()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self, part: str, limit_s: float) -> None:
        self._deadline = None
        message = f"the request's {part} did not arrive within {limit_s:g} s of its start"
        self._close_with(raw_answer(408, b"Request Timeout", "request_timeout", message))

    def _close_with(self, answer: bytes) -> None:
        """Answer with ``answer`` and close; what the client sends from now on is dropped.
        Twisted's idle time-out closes so too: once what was written is sent, or by force
        ``abortTimeout`` seconds on, should the client read nothing."""
        self._closing = True
        self.persistent = False
        self.setTimeout(None)  # the idle timer has nothing left to close
        assert self.transport is not None, "a connected channel has a transport"
        self.transport.write(answer)
        self.timeoutConnection()


class BoundedRequest(Request):
    """A Request that stops buffering its body once it is over ``max_body_bytes``, judged
    from Content-Length before any of the body arrives, or while it streams in; and that
    drops its body unread when ``refuse_early`` answers it from its headers or marks it
    ``body_unread``."""

    #: The setting's default; ``bounded_request_factory`` sets the one configured.
    max_body_bytes = RequestLimits().max_body_bytes
    early_answer: EarlyAnswer | None = None
    refuse_early: RefuseEarly = staticmethod(_let_through)
    #: Screens every request while no token is set (``bounded_request_factory``).
    guard: BrowserGuard | None = None
    state: RequestState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = RequestState(started_s=time.monotonic())

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted API)
        state = self.state
        state.request_id = logs.request_id(self.getHeader(b"x-request-id"))
        self.setHeader(b"X-Request-Id", state.request_id.encode())
        if length is not None and length > self.max_body_bytes:
            state.body_over_limit = True
        else:
            # Served by a RequestLineChannel; another channel gives no line: nothing is
            # refused early.
            line = (
                self.channel.request_line if isinstance(self.channel, RequestLineChannel) else b""
            )
            method, _, rest = line.partition(b" ")
            path = rest.partition(b" ")[0]
            if method and path:
                self.early_answer = self._screened(method, path) or self.refuse_early(
                    self, method, path
                )
        super().gotLength(0 if self._drops_body() else length)

    def _drops_body(self) -> bool:
        state = self.state
        return state.body_over_limit or state.body_unread or self.early_answer is not None

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self._drops_body() or self.content is None:
            return
        if self.content.tell() + len(data) > self.max_body_bytes:
            self.state.body_over_limit = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    def _screened(self, method: bytes, path: bytes) -> EarlyAnswer | None:
        """The guard's refusal of this request, as an answer; None when it passes."""
        if self.guard is None:
            return None
        refusal = self.guard.refusal(method, path, self.requestHeaders, self.isSecure())
        return None if refusal is None else partial(_refuse, refusal)

    def process(self) -> None:
        if self.early_answer is None:
            super().process()
            return
        # What Request.process does before routing, then the answer: no resource lookup.
        # Site.buildProtocol gives each channel its site.
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.setHeader(b"Date", datetimeToString())
        self.early_answer(self)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # Request.process sets Twisted's name and version; every answer, refusals and
            # errors included, is written through here first.
            self.responseHeaders.setRawHeaders(b"Server", [SERVER])
        super().write(data)


def _refuse(refusal: Refusal, request: Request) -> None:
    body = error_body(request, refusal.status, refusal.code, refusal.message)
    if refusal.status in _REASONS:
        request.setResponseCode(refusal.status, _REASONS[refusal.status])
    request.write(body)
    request.finish()


def bounded_request_factory(
    max_body_bytes: int,
    refuse_early: RefuseEarly | None = None,
    guard: BrowserGuard | None = None,
) -> type[BoundedRequest]:
    """A BoundedRequest class with its limit, guard and refusal, for
    ``Site(requestFactory=...)``."""
    attributes = {
        "max_body_bytes": max_body_bytes,
        "refuse_early": staticmethod(refuse_early or _let_through),
        "guard": guard,
    }
    return type("BoundedRequest", (BoundedRequest,), attributes)


# -- the client behind a proxy -----------------------------------------------------------

#: What a forwarding header may name instead of an address (RFC 7239 section 6): "unknown",
#: or an obfuscated identifier that the proxy chose.
_IDENTIFIER = re.compile(r"unknown|_[A-Za-z0-9._-]+")
_PORT = r"(?::(?:[0-9]{1,5}|_[A-Za-z0-9._-]+))?"
#: A node with its port: "[IPv6]:port", or "IPv4:port" and "identifier:port".
_BRACKETED = re.compile(rf"\[([0-9A-Fa-f:.]+(?:%[^\]]+)?)\]{_PORT}")
_WITH_PORT = re.compile(rf"([0-9.]+|{_IDENTIFIER.pattern}){_PORT}")
#: Forwarded's grammar (RFC 7239 section 4, RFC 7230's token and quoted-string).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PAIR = re.compile(rf"\s*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})\s*")
#: A Forwarded element (between commas) or pair (between semicolons), where a quoted string,
#: terminated or not, hides what separates them. A quoted string always matches to its end
#: (its closing quote, or the end of the header), so that no header makes the search
#: backtrack: a search from each of its characters would take time quadratic in its length.
_IN_QUOTES = r'"(?:[^"\\]|\\.)*(?:"|\\?$)'
_ELEMENT = re.compile(rf"(?:[^,\"]|{_IN_QUOTES})+")
_PAIR_TEXT = re.compile(rf"(?:[^;\"]|{_IN_QUOTES})+")


def _ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _node(text: str) -> IPAddress | str | None:
    """A node of a forwarding header, its port dropped: its IP address, or "unknown" or an
    obfuscated identifier as written; None when it is none of these."""
    text = text.strip()
    bracketed = _BRACKETED.fullmatch(text)
    if bracketed:
        return _ip(bracketed.group(1))
    address = _ip(text)  # X-Forwarded-For writes IPv6 bare
    if address is not None:
        return address
    with_port = _WITH_PORT.fullmatch(text)
    if with_port is None:
        return None
    host = with_port.group(1)
    return _ip(host) or (host if _IDENTIFIER.fullmatch(host) else None)


def _forwarded_node(element: str) -> IPAddress | str | None:
    """The ``for=`` node of one element of a Forwarded header; None when the element
    cannot be read or names none."""
    node = None
    for text in _PAIR_TEXT.findall(element):
        pair = _PAIR.fullmatch(text)
        if pair is None:
            return None
        name, value = pair.groups()
        if name.lower() == "for":
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            node = _node(value)
    return node


@functools.lru_cache(maxsize=1024)
def _trusted(peer: str, trusted_proxies: tuple[IPNetwork, ...]) -> bool:
    """Whether the peer ``peer`` is one of ``trusted_proxies`` (asked of every request: a
    server has few peers, each asked once)."""
    address = _ip(peer)
    return address is not None and any(address in network for network in trusted_proxies)


def forwarded_client(
    peer: str | None, headers: Headers, trusted_proxies: Sequence[IPNetwork]
) -> str | None:
    """The client of a request whose TCP peer is ``peer`` (an IP address, or None): the
    peer itself, unless it is in ``trusted_proxies``. A trusted proxy's request names the
    client in ``X-Forwarded-For`` (or, without one, RFC 7239's ``Forwarded: for=``): each
    proxy appends the address it was called from, so the client is the right-most node that
    is not a trusted proxy's (the left-most when all are), and whatever a client wrote to
    the left of it is never read. A node that is not an address ("unknown", ``_hidden``) is
    the client as named; when that node cannot be read, or there is no header, the client
    is the peer. Never raises: a malformed header does not fail a request."""
    if peer is None or not _trusted(peer, tuple(trusted_proxies)):
        return peer
    nodes: list[str]
    read: Callable[[str], IPAddress | str | None]
    x_forwarded_for = headers.getRawHeaders(b"x-forwarded-for")
    if x_forwarded_for:
        joined = b",".join(x_forwarded_for).decode("latin-1")
        nodes, read = [n for n in joined.split(",") if n.strip()], _node
    else:
        forwarded = b",".join(headers.getRawHeaders(b"forwarded", [])).decode("latin-1")
        nodes, read = [e for e in _ELEMENT.findall(forwarded) if e.strip()], _forwarded_node
    client: IPAddress | str | None = None
    for text in reversed(nodes):
        client = read(text)
        if client is None:
            return peer
        if isinstance(client, str) or not any(client in n for n in trusted_proxies):
            break
    return peer if client is None else str(client)


# -- the access log ----------------------------------------------------------------------


def _no_access_log(request: Request) -> None:
    pass


def log_access(request: Request, trusted_proxies: Sequence[IPNetwork] = ()) -> None:
    """The access line of a finished request; its client as ``forwarded_client`` says."""
    state = state_of(request)
    call = state.call
    peer = getattr(request.getClientAddress(), "host", None)
    length = request.getHeader(b"content-length")
    logs.log_access(
        {
            "request_id": state.request_id,
            "method": request.method.decode("latin-1"),
            "route": state.route,
            "path": request.path.decode("utf-8", "replace"),
            "status": request.code,
            "bytes_in": int(length) if length and length.isdigit() else 0,
            "bytes_out": request.sentLength,
            "latency_ms": round((time.monotonic() - state.started_s) * 1e3, 2),
            "images": call.images if call is not None else 0,
            "batch_size": call.batch_size if call is not None else 0,
            "client": forwarded_client(peer, request.requestHeaders, trusted_proxies),
        }
    )


class _Site(Site):
    """The Site of ``make_site``: its channels keep their request lines, held to its
    connection limits, counted in ``connections``."""

    # Twisted declares the protocol factory as a method; a channel class is what it calls.
    protocol = RequestLineChannel  # type: ignore[assignment]
    noisy = False  # no "Starting factory <_Site object at 0x...>" in the log

    def __init__(self, resource: IResource, limits: ConnectionLimits | None, **kwargs: Any) -> None:
        if limits is not None:
            kwargs["timeout"] = limits.idle_timeout_s
        super().__init__(resource, **kwargs)
        self.limits = limits
        self.connections = OpenConnections(limits.max_connections if limits else None)

    # Twisted's annotation names the generic channel its own protocol attribute builds.
    def buildProtocol(  # type: ignore[override]  # noqa: N802 (Twisted API)
        self, addr: IAddress | None
    ) -> RequestLineChannel:
        channel = super().buildProtocol(addr)
        assert isinstance(channel, RequestLineChannel), "protocol is a RequestLineChannel"
        channel.limits = self.limits
        channel.connections = self.connections
        channel.clock = self.reactor
        return channel


def make_site(
    resource: IResource,
    max_body_bytes: int,
    access_log: bool,
    refuse_early: RefuseEarly | None = None,
    trusted_proxies: Sequence[IPNetwork] = (),
    guard: BrowserGuard | None = None,
    limits: ConnectionLimits | None = None,
    clock: IReactorTime | None = None,
) -> Site:
    """A Site that serves ``resource`` as batchserve does: bodies bounded, requests screened
    by ``guard`` (none: every request passes) and then refused from their headers by
    ``refuse_early``, connections held to ``limits`` (none: Twisted's 12 h idle timer
    alone) on ``clock`` (none: the global reactor), multipart left to the API (Twisted would
    parse it a second time, on the reactor), one access line per request (or none), naming
    the client that a peer in ``trusted_proxies`` forwarded for (none: the peer)."""
    site = _Site(
        resource,
        limits,
        requestFactory=bounded_request_factory(max_body_bytes, refuse_early, guard),
        parsePOSTFormSubmission=False,
        reactor=clock,
    )
    logged = partial(log_access, trusted_proxies=tuple(trusted_proxies))
    site.log = logged if access_log else _no_access_log  # type: ignore[method-assign,assignment]
    return site
