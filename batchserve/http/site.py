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
from typing import Any

from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.server import Request, Site, version

from batchserve.serving import logs

#: Writes a whole response to ``request`` and finishes it.
EarlyAnswer = Callable[[Request], None]

#: Called once a request's headers are in, before its body: how to answer it at once, or
#: None to let it through to its handler.
RefuseEarly = Callable[[Request, bytes, bytes], EarlyAnswer | None]


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

    max_body_bytes = 32 * 1024 * 1024
    body_over_limit = False
    #: The client's X-Request-Id, or one made for it; returned in the response's header.
    request_id = ""
    #: The route that answered (set by the API), and what it ran (its service Call).
    route: str | None = None
    call: Any = None
    #: Set by the API when its token and room were checked from the headers.
    admitted_early = False
    early_answer: EarlyAnswer | None = None
    refuse_early: RefuseEarly = staticmethod(_let_through)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_s = time.monotonic()

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted API)
        self.request_id = logs.request_id(self.getHeader(b"x-request-id"))
        self.setHeader(b"X-Request-Id", self.request_id.encode())
        if length is not None and length > self.max_body_bytes:
            self.body_over_limit = True
        else:
            # Served by a RequestLineChannel; another channel gives no line: nothing is
            # refused early.
            method, _, rest = getattr(self.channel, "request_line", b"").partition(b" ")
            path = rest.partition(b" ")[0]
            if method and path:
                self.early_answer = self.refuse_early(self, method, path)
        dropped = self.body_over_limit or self.early_answer is not None
        super().gotLength(0 if dropped else length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.body_over_limit or self.early_answer is not None or self.content is None:
            return
        if self.content.tell() + len(data) > self.max_body_bytes:
            self.body_over_limit = True
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
    call = getattr(request, "call", None)
    address = request.getClientAddress()
    length = request.getHeader(b"content-length")
    logs.log_access(
        {
            "request_id": getattr(request, "request_id", ""),
            "method": request.method.decode("latin-1"),
            "route": getattr(request, "route", None),
            "path": request.path.decode("utf-8", "replace"),
            "status": request.code,
            "bytes_in": int(length) if length and length.isdigit() else 0,
            "bytes_out": request.sentLength,
            "latency_ms": round((time.monotonic() - getattr(request, "started_s", 0.0)) * 1e3, 2),
            "images": getattr(call, "images", 0),
            "batch_size": getattr(call, "batch_size", 0),
            "client": getattr(address, "host", None),
        }
    )


class _Site(Site):
    # Twisted declares the protocol factory as a method; a channel class is what it calls.
    protocol = RequestLineChannel  # type: ignore[assignment]


def make_site(
    resource: Any,
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
