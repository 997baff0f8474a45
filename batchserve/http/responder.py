"""What every route of the API shares, v1 and v2 alike: admission (token, query
parameters, room in the queue, draining), the request's own deadline and body, errors
mapped to responses, and metrics per request.

A request for the model may be admitted or refused from its headers alone, before its
body is buffered (``refuse_early``, called by the site); every other request is checked
when its handler runs (``respond``), and its body is kept only if its token opens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from batchserve.errors import (
    BatchserveError,
    InternalError,
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from batchserve.http.auth import Tokens, writes
from batchserve.http.bodies import RequestLimits, carries_images
from batchserve.http.drain import InFlight, close_after_response
from batchserve.http.inputs import MAX_TIMEOUT_MS, MIN_TIMEOUT_MS, bounded_int
from batchserve.http.pacing import RefusalPacer
from batchserve.http.site import state_of
from batchserve.http.wire import (
    Prepared,
    api_headers,
    domain_error_body,
    json_body,
    status_for,
)
from batchserve.serving.service import Call, ImageService

log = Logger()

#: POST routes whose images go through the model's queue, by path.
QUEUED_ROUTES = {
    b"/v1/embed": "/v1/embed",
    b"/v1/classify": "/v1/classify",
    b"/v1/search": "/v1/search",
    b"/v1/duplicates": "/v1/duplicates",
    b"/v1/items": "/v1/items",
}

#: Status recorded in metrics for a client that hung up before its response (nginx's code).
CLIENT_CLOSED = 499

#: The header that carries a request's own deadline, as the ``timeout_ms`` parameter does.
TIMEOUT_HEADER = b"x-timeout-ms"

#: A route's work: the JSON document or a Prepared response, or a Deferred of either.
Work = Callable[[], Deferred[Any] | Any]

#: How a route writes a domain error: its status, headers and body.
ErrorBody = Callable[[IRequest, BatchserveError], bytes]


class ApiMetrics(Protocol):
    """What the API counts, and the page it serves at /metrics: ``serving.metrics.Metrics``
    in one process; in an edge process, counted by the core (``workers/edge.py``), whose
    page comes as a Deferred."""

    content_type: str

    def request_done(self, route: str, code: int, seconds: float) -> None: ...

    def refusal_held(self) -> None: ...

    def render(self) -> bytes | Deferred[bytes]: ...


class Responder:
    """Runs the routes' work under the API's rules and answers for them.

    ``known_params`` holds the query parameters each operation takes, by (lower-case
    method, route); a request to one of them with any other is refused."""

    def __init__(
        self,
        service: ImageService,
        metrics: ApiMetrics,
        limits: RequestLimits,
        tokens: Tokens,
        known_params: Mapping[tuple[str, str], set[str]],
        pacer: RefusalPacer | None = None,
    ) -> None:
        self._service = service
        self._pacer = pacer
        self._metrics = metrics
        self._limits = limits
        self._tokens = tokens
        self._known_params = known_params
        self.in_flight = InFlight()

    def respond(
        self,
        request: IRequest,
        route: str,
        work: Work,
        errors: ErrorBody = domain_error_body,
    ) -> Deferred[bytes]:
        """Run ``work`` (returns the JSON document or a Prepared response), map errors (to
        the body ``errors`` writes), record metrics."""
        started = time.perf_counter()
        state_of(request).route = route
        self._release_room(request)  # the handler checks room itself, now the body is in

        def ok(doc: Any) -> bytes:
            if isinstance(doc, Prepared):
                api_headers(request)  # its own Cache-Control, if any, replaces no-store
                return doc.write_to(request)
            return json_body(request, 200, doc)

        def failed(failure: Failure) -> bytes | Failure | Deferred[bytes]:
            if failure.check(CancelledError):
                self._metrics.request_done(route, CLIENT_CLOSED, time.perf_counter() - started)
                return failure  # Klein drops it: the client is gone
            error = failure.value
            wait_s = self._hold_s(error)
            if wait_s > 0:
                assert self._pacer is not None, "only a pacer holds a refusal"
                return deferLater(self._pacer.clock, wait_s, errors, request, error)
            if isinstance(error, BatchserveError):
                if status_for(error) >= 500 and not isinstance(error, Overloaded | NotReady):
                    log.error("{route}: {error}", route=route, error=error)
                return errors(request, error)
            log.failure("{route}: unexpected error", failure, route=route)
            return errors(request, InternalError("internal server error"))

        def record(result: Any) -> Any:
            if entered:
                self.in_flight.leave()
            if self.in_flight.closing:
                # Draining: the connection's last response, whether the request was taken
                # before the drain or refused after it.
                close_after_response(request)
            if not isinstance(result, Failure):
                code = getattr(request, "code", 200)
                self._metrics.request_done(route, int(code), time.perf_counter() - started)
            return result

        try:
            self.in_flight.enter(request)
        except NotReady as e:
            entered = False
            d: Deferred[Any] = fail(e)
        else:
            entered = True
            d = maybeDeferred(self._checked, request, route, work)
        d.addCallbacks(ok, failed)
        d.addBoth(record)
        return d

    def refuse_early(
        self, request: IRequest, method: bytes, path: bytes
    ) -> Callable[[IRequest], None] | None:
        """How to answer at once, from its headers, a request for the model that cannot be
        taken now (bad or missing token, queue full, model or index loading): the answer its
        handler would give, without its body ever being buffered or parsed (see site.py).
        None lets the request through to its handler, which decides: every request that is
        not plainly images (a JSON search may carry vectors), or that comes while the server
        drains; the body of one whose token does not open it is dropped unread all the same
        (``_screen_token``). A refused request counts as one image rejected."""
        path = path.split(b"?", 1)[0]
        route = self._image_route(request, method, path)
        if route is None:
            self._screen_token(request, method, path)
            return None
        try:
            self._admit(request, route)
        except BatchserveError as error:
            return self._answer_now(route, error)
        return None

    def _image_route(self, request: IRequest, method: bytes, path: bytes) -> str | None:
        """The queued route of a request that is plainly images, to admit from its headers;
        None for any other, and for every request while the server drains."""
        route = QUEUED_ROUTES.get(path) if method.upper() == b"POST" else None
        if route is None or self.in_flight.closing:
            return None
        content_type = request.getHeader(b"content-type")
        images = carries_images(content_type.decode("latin-1") if content_type else None)
        return route if images else None

    def _screen_token(self, request: IRequest, method: bytes, path: bytes) -> None:
        """Drop unread the body of a request that its token does not open. Its handler
        refuses it from the same header, as it would have, and reads no body first: every
        route that reads one checks the token before (``_checked``, with the same rule for
        writes); a route open to all reads none."""
        try:
            self._tokens.check(request.getHeader(b"authorization"), writes(method, path))
        except BatchserveError:
            state_of(request).body_unread = True

    def _admit(self, request: IRequest, route: str) -> None:
        """The one admission check of a request for the model, from its headers: its token,
        then room for it (see ImageService.admit). Raises the domain error to answer."""
        self._tokens.check(request.getHeader(b"authorization"), route == "/v1/items")
        self._service.admit(
            needs_index=route in ("/v1/search", "/v1/duplicates", "/v1/items"),
            reserve=True,
            timeout_s=_header_timeout_s(request),
        )
        state = state_of(request)
        state.admitted_early = state.holds_room = True
        # Given back when its handler runs, or when it ends without one (the client hung up
        # before its body was in).
        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addBoth(lambda _: self._release_room(request))

    def _release_room(self, request: IRequest) -> None:
        state = state_of(request)
        if state.holds_room:
            state.holds_room = False
            self._service.release()

    def _answer_now(self, route: str, error: BatchserveError) -> Callable[[IRequest], None]:
        started = time.perf_counter()

        def write(request: IRequest) -> None:
            request.write(domain_error_body(request, error))
            request.finish()
            self._metrics.request_done(route, status_for(error), time.perf_counter() - started)

        def answer(request: IRequest) -> None:
            state_of(request).route = route
            wait_s = self._hold_s(error)
            if wait_s <= 0:
                write(request)
                return
            assert self._pacer is not None, "only a pacer holds a refusal"
            held = self._pacer.clock.callLater(wait_s, write, request)

            def gone(_reason: Failure) -> None:
                if held.active():  # the client hung up while its refusal was held
                    held.cancel()

            request.notifyFinish().addErrback(gone)  # type: ignore[attr-defined]

        return answer

    def _hold_s(self, error: object) -> float:
        """How long to hold the answer to ``error``: a refusal for want of room may wait
        its turn (see pacing.py); nothing else waits."""
        if self._pacer is None or not isinstance(error, Overloaded):
            return 0.0
        wait_s = self._pacer.delay_s(error.retry_after_s)
        if wait_s > 0:
            self._metrics.refusal_held()
        return wait_s

    def _checked(self, request: IRequest, route: str, work: Work) -> Deferred[Any] | Any:
        """``work()`` once the request's token and query parameters are checked."""
        if not state_of(request).admitted_early:  # checked from its headers already
            write = writes(request.method, route.encode())
            self._tokens.check(request.getHeader(b"authorization"), write)
        known = self._known_params.get((request.method.decode("latin-1").lower(), route))
        unknown = sorted(set(self.query_of(request)) - (known or set()))
        if known is not None and unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(
                f"unknown query parameter {', '.join(unknown)}; {route} takes: {allowed}"
            )
        return work()

    def call_of(self, request: IRequest) -> Call:
        """The request's own deadline: ``timeout_ms`` or the X-Timeout-Ms header (the
        shorter when both are given; each must be within bounds)."""
        given = [request.args.get(b"timeout_ms", [None])[0], request.getHeader(TIMEOUT_HEADER)]
        asked = [_timeout_ms(raw) for raw in given if raw is not None]
        call = Call(timeout_s=min(asked) / 1000.0 if asked else None)
        state_of(request).call = call  # the access line reports its images and batch
        return call

    def body_of(self, request: IRequest) -> tuple[str | None, IO[bytes] | bytes]:
        """The request's Content-Type and body (a file Twisted wrote it to, or bytes), to
        be read on the decode pool; PayloadTooLarge when it was over the limit."""
        if state_of(request).body_over_limit:
            raise PayloadTooLarge(f"body is over the limit of {self._limits.max_body_bytes} bytes")
        content_type = request.getHeader(b"content-type")
        body = request.content if request.content is not None else b""
        return (content_type.decode("latin-1") if content_type else None), body

    @staticmethod
    def query_of(request: IRequest) -> dict[str, str]:
        """The request's query parameters, the first value of each, as text."""
        return {
            k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
            for k, v in request.args.items()
            if v
        }


def _header_timeout_s(request: IRequest) -> float | None:
    """The deadline its X-Timeout-Ms header sets, to admit it by, when it is a valid one (an
    invalid one is the handler's 400; ``timeout_ms`` in the query is read with the body)."""
    raw = request.getHeader(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        return _timeout_ms(raw) / 1000
    except BatchserveError:
        return None


def _timeout_ms(raw: bytes) -> int:
    """A deadline as sent (``timeout_ms`` or X-Timeout-Ms), within its bounds."""
    return bounded_int(raw.decode("latin-1"), "timeout_ms", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS)
