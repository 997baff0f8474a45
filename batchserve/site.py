"""The Twisted Site that serves the API: request bodies bounded, requests refused from their
headers when their work cannot be taken, multipart left to the API, access log on or off.

A request is judged twice before its handler runs, both times from its headers alone, so
that what will be refused is never buffered nor parsed: a ``Content-Length`` over the limit
(answered 413 by the handler), and ``refuse_early(request, method, path)``, which may return
how to answer the request at once. Under overload most requests are refusals; this keeps
their cost to reading the bytes off the socket, not routing, parsing and JSON-encoding them.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.http import datetimeToString
from twisted.web.server import Request, Site, version

#: Writes a whole response to ``request`` and finishes it.
EarlyAnswer = Callable[[Request], None]

#: Called once a request's headers are in, before its body: how to answer it at once, or
#: None to let it through to its handler.
RefuseEarly = Callable[[Request, bytes, bytes], EarlyAnswer | None]


def _let_through(request: Request, method: bytes, path: bytes) -> EarlyAnswer | None:
    return None


class BoundedRequest(Request):
    """A Request that stops buffering its body once it is over ``max_body_bytes``, judged
    from Content-Length before any of the body arrives, or while it streams in; and that
    drops its body unread when ``refuse_early`` answers it from its headers."""

    max_body_bytes = 32 * 1024 * 1024
    body_over_limit = False
    early_answer: EarlyAnswer | None = None
    refuse_early: RefuseEarly = staticmethod(_let_through)

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted API)
        if length is not None and length > self.max_body_bytes:
            self.body_over_limit = True
        else:
            # The request line as HTTPChannel parsed it; Request.method and .uri are only
            # set once the body is in. Without them (another Twisted), nothing is refused.
            method = getattr(self.channel, "_command", None)
            path = getattr(self.channel, "_path", None)
            if isinstance(method, bytes) and isinstance(path, bytes):
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


def configure_site(
    site: Site, max_body_bytes: int, access_log: bool, refuse_early: RefuseEarly | None = None
) -> Site:
    """Make ``site`` serve batchserve: bodies bounded, requests refused from their headers
    by ``refuse_early``, multipart left to the API (Twisted would parse it a second time on
    the reactor), access log on or off."""
    site.requestFactory = bounded_request_factory(max_body_bytes, refuse_early)
    site._parsePOSTFormSubmission = False
    if not access_log:
        site.log = _no_access_log  # type: ignore[method-assign,assignment]
    return site
