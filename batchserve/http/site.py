"""The Twisted Site that serves the API: request bodies bounded, requests refused from their
headers when their work cannot be taken, multipart left to the API, access log on or off.

A request is judged twice before its handler runs, both times from its headers alone, so
that what will be refused is never buffered nor parsed: a ``Content-Length`` over the limit
(answered 413 by the handler), and ``refuse_early(request, method, path)``, which may return
how to answer the request at once. Under overload most requests are refusals; this keeps
their cost to reading the bytes off the socket, not routing, parsing and JSON-encoding them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site, version

from batchserve.http.bodies import RequestLimits
from batchserve.serving import logs
from batchserve.serving.service import Call

#: Writes a whole response to ``request`` and finishes it.
EarlyAnswer = Callable[[Request], None]

#: Called once a request's headers are in, before its body: how to answer it at once, or
#: None to let it through to its handler.
RefuseEarly = Callable[[Request, bytes, bytes], EarlyAnswer | None]


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


def state_of(request: IRequest) -> RequestState:
    """The state of a request this site made; a request made elsewhere (a test's stub)
    keeps none, so it gets a fresh record whose writes go nowhere."""
    return request.state if isinstance(request, BoundedRequest) else RequestState()


def _let_through(request: Request, method: bytes, path: bytes) -> EarlyAnswer | None:
    return None


class RequestLineChannel(HTTPChannel):
    """An HTTPChannel that keeps the request line of the request whose headers it is
    reading, so that the request can be judged from its method and path once its headers
    are in, before its body (Twisted sets ``Request.method`` and ``uri`` only after it)."""

    request_line = b""
    _awaiting_request_line = True

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted API)
        if self._awaiting_request_line and line:
            self.request_line = line
            self._awaiting_request_line = False
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:  # noqa: N802 (Twisted API)
        self._awaiting_request_line = True  # the next line starts the next request
        super().allHeadersReceived()


class BoundedRequest(Request):
    """A Request that stops buffering its body once it is over ``max_body_bytes``, judged
    from Content-Length before any of the body arrives, or while it streams in; and that
    drops its body unread when ``refuse_early`` answers it from its headers."""

    #: The setting's default; ``bounded_request_factory`` sets the one configured.
    max_body_bytes = RequestLimits().max_body_bytes
    early_answer: EarlyAnswer | None = None
    refuse_early: RefuseEarly = staticmethod(_let_through)
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
                self.early_answer = self.refuse_early(self, method, path)
        dropped = state.body_over_limit or self.early_answer is not None
        super().gotLength(0 if dropped else length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.state.body_over_limit or self.early_answer is not None or self.content is None:
            return
        if self.content.tell() + len(data) > self.max_body_bytes:
            self.state.body_over_limit = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self.early_answer is None:
            super().process()
            return
        # What Request.process does before routing, then the answer: no resource lookup.
        # Site.buildProtocol gives each channel its site.
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.setHeader(b"Server", version)
        self.setHeader(b"Date", datetimeToString())
        self.early_answer(self)


def bounded_request_factory(
    max_body_bytes: int, refuse_early: RefuseEarly | None = None
) -> type[BoundedRequest]:
    """A BoundedRequest class with its limit and refusal, for ``Site(requestFactory=...)``."""
    attributes = {
        "max_body_bytes": max_body_bytes,
        "refuse_early": staticmethod(refuse_early or _let_through),
    }
    return type("BoundedRequest", (BoundedRequest,), attributes)


def _no_access_log(request: Request) -> None:
    pass


def log_access(request: Request) -> None:
    """The access line of a finished request."""
    state = state_of(request)
    call = state.call
    address = request.getClientAddress()
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
            "client": getattr(address, "host", None),
        }
    )


class _Site(Site):
    # Twisted declares the protocol factory as a method; a channel class is what it calls.
    protocol = RequestLineChannel  # type: ignore[assignment]


def make_site(
    resource: IResource,
    max_body_bytes: int,
    access_log: bool,
    refuse_early: RefuseEarly | None = None,
) -> Site:
    """A Site that serves ``resource`` as batchserve does: bodies bounded, requests refused
    from their headers by ``refuse_early``, multipart left to the API (Twisted would parse
    it a second time, on the reactor), one access line per request (or none)."""
    site = _Site(
        resource,
        requestFactory=bounded_request_factory(max_body_bytes, refuse_early),
        parsePOSTFormSubmission=False,
    )
    site.log = log_access if access_log else _no_access_log  # type: ignore[method-assign,assignment]
    return site
