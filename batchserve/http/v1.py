"""The HTTP API: Klein routes, admission (token, query parameters, room in the queue) and
the request's own deadline; the wire format is in wire.py, the pages in web.py.

Every /v1 answer is JSON; every error is ``{"error": {"code": ..., "message": ...}}``.
Handlers do no blocking work: bodies are read and images decoded on the decode pool and
run on the inference thread by the service.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from batchserve.errors import (
    BatchserveError,
    InternalError,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from batchserve.http import web
from batchserve.http.auth import Tokens
from batchserve.http.bodies import RequestLimits, carries_images, read_images
from batchserve.http.drain import InFlight
from batchserve.http.inputs import (
    DEFAULT_PAGE,
    MAX_PAGE,
    MAX_TIMEOUT_MS,
    MIN_TIMEOUT_MS,
    bounded_int,
    read_items,
    read_search,
    search_task,
)
from batchserve.http.openapi import document as openapi
from batchserve.http.routing import PathSegment, Utf8URLs
from batchserve.http.site import BoundedRequest
from batchserve.http.v2 import OpenInferenceAPI
from batchserve.http.wire import (
    Binary,
    Prepared,
    allow,
    domain_error_body,
    error_body,
    item_json,
    json_body,
    matches_doc,
    model_json,
    page_doc,
    status_for,
    timed,
)
from batchserve.serving.metrics import Metrics
from batchserve.serving.records import Label
from batchserve.serving.service import Call, ImageService

log = Logger()

#: POST routes whose images go through the model's queue, by path.
QUEUED_ROUTES = {
    b"/v1/embed": "/v1/embed",
    b"/v1/classify": "/v1/classify",
    b"/v1/search": "/v1/search",
    b"/v1/items": "/v1/items",
}

#: Status recorded in metrics for a client that hung up before its response (nginx's code).
CLIENT_CLOSED = 499

DEFAULT_TOP_K = 5

#: The header that carries a request's own deadline, as the ``timeout_ms`` parameter does.
TIMEOUT_HEADER = b"x-timeout-ms"


def close_after_response(request: IRequest) -> None:
    """Answer, then close the connection (a client should reconnect to another server)."""
    request.setHeader(b"Connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


class BatchserveAPI:
    """The Klein application; ``app.resource()`` is the root resource to serve."""

    app = Klein()
    app.url_map.converters["segment"] = PathSegment

    def __init__(
        self,
        service: ImageService,
        metrics: Metrics,
        limits: RequestLimits,
        tokens: Tokens | None = None,
        metrics_here: bool = True,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._limits = limits
        self._tokens = tokens or Tokens()
        self._metrics_here = metrics_here
        self.in_flight = InFlight()
        self._openapi = openapi.document(limits)
        self._known_params = openapi.query_parameters(self._openapi)
        self._docs: web.Asset | None = None

    def resource(self) -> Any:
        v2 = OpenInferenceAPI(self, self._service, self._limits)
        return Utf8URLs(self.app.resource(), {b"v2": v2.resource()})

    # -- plumbing ---------------------------------------------------------------------

    def respond(
        self,
        request: IRequest,
        route: str,
        work: Callable[[], Deferred[Any] | Any],
        errors: Callable[[IRequest, BatchserveError], bytes] = domain_error_body,
    ) -> Deferred[bytes]:
        """Run ``work`` (returns the JSON document or a Prepared response), map errors (to
        the body ``errors`` writes), record metrics."""
        started = time.perf_counter()
        if isinstance(request, BoundedRequest):
            request.route = route

        def ok(doc: Any) -> bytes:
            if isinstance(doc, Prepared):
                return doc.write_to(request)
            return json_body(request, 200, doc)

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(CancelledError):
                self._metrics.request_done(route, CLIENT_CLOSED, time.perf_counter() - started)
                return failure  # Klein drops it: the client is gone
            error = failure.value
            if isinstance(error, BatchserveError):
                if status_for(error) >= 500 and not isinstance(error, Overloaded | NotReady):
                    log.error("{route}: {error}", route=route, error=error)
                return errors(request, error)
            log.failure("{route}: unexpected error", failure, route=route)
            return errors(request, InternalError("internal server error"))

        def record(result: Any) -> Any:
            if entered:
                self.in_flight.leave()
            if not isinstance(result, Failure):
                code = getattr(request, "code", 200)
                self._metrics.request_done(route, int(code), time.perf_counter() - started)
            return result

        try:
            self.in_flight.enter()
        except NotReady as e:
            entered = False
            d: Deferred[Any] = fail(e)
            close_after_response(request)
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
        drains. A refused request counts as one image rejected."""
        route = QUEUED_ROUTES.get(path.split(b"?", 1)[0]) if method == b"POST" else None
        if route is None or self.in_flight.closing:
            return None
        content_type = request.getHeader(b"content-type")
        if not carries_images(content_type.decode("latin-1") if content_type else None):
            return None
        try:
            self._admit(request, route)
        except BatchserveError as error:
            return self._answer_now(route, error)
        return None

    def _admit(self, request: IRequest, route: str) -> None:
        """The one admission check of a request for the model, from its headers: its token,
        then room for it (see ImageService.admit). Raises the domain error to answer."""
        self._tokens.check(request.getHeader(b"authorization"), route == "/v1/items")
        self._service.admit(needs_index=route in ("/v1/search", "/v1/items"))
        if isinstance(request, BoundedRequest):
            request.admitted_early = True

    def _answer_now(self, route: str, error: BatchserveError) -> Callable[[IRequest], None]:
        started = time.perf_counter()

        def answer(request: IRequest) -> None:
            if isinstance(request, BoundedRequest):
                request.route = route
            request.write(domain_error_body(request, error))
            request.finish()
            self._metrics.request_done(route, status_for(error), time.perf_counter() - started)

        return answer

    def _checked(
        self, request: IRequest, route: str, work: Callable[[], Deferred[Any] | Any]
    ) -> Deferred[Any] | Any:
        """``work()`` once the request's token and query parameters are checked."""
        if not getattr(request, "admitted_early", False):  # checked from its headers already
            write = route.startswith("/v1/items") and request.method in (b"POST", b"DELETE")
            self._tokens.check(request.getHeader(b"authorization"), write)
        known = self._known_params.get((request.method.decode("latin-1").lower(), route))
        unknown = sorted(set(self._query(request)) - (known or set()))
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
        asked = [
            bounded_int(raw.decode("latin-1"), "timeout_ms", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS)
            for raw in given
            if raw is not None
        ]
        call = Call(timeout_s=min(asked) / 1000.0 if asked else None)
        if isinstance(request, BoundedRequest):
            request.call = call  # the access line reports its images and batch
        return call

    def body_of(self, request: IRequest) -> tuple[str | None, IO[bytes] | bytes]:
        """The request's Content-Type and body (a file Twisted wrote it to, or bytes), to
        be read on the decode pool; PayloadTooLarge when it was over the limit."""
        if getattr(request, "body_over_limit", False):
            raise PayloadTooLarge(f"body is over the limit of {self._limits.max_body_bytes} bytes")
        content_type = request.getHeader(b"content-type")
        body = request.content if request.content is not None else b""
        return (content_type.decode("latin-1") if content_type else None), body

    def _query(self, request: IRequest) -> dict[str, str]:
        return {
            k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
            for k, v in request.args.items()
            if v
        }

    # -- inference ----------------------------------------------------------------------

    @app.route("/v1/embed", methods=["POST"])
    def embed(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self.call_of(request)
            content_type, body = self.body_of(request)
            d = self._service.embed(lambda: read_images(content_type, body, self._limits), call)
            return d.addCallback(lambda found: timed(request, call, self._embed_doc(found)))

        return self.respond(request, "/v1/embed", work)

    def _embed_doc(self, embeddings: list[Any]) -> dict[str, Any]:
        info = self._service.info
        return {
            "model": info.name if info else None,
            "dim": info.dim if info else None,
            "results": [{"embedding": e} for e in embeddings],
        }

    @app.route("/v1/classify", methods=["POST"])
    def classify(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self.call_of(request)
            top_k = _int_arg(request, "k", DEFAULT_TOP_K, 1, 1000)
            content_type, body = self.body_of(request)
            read = lambda: read_images(content_type, body, self._limits)  # noqa: E731
            d = self._service.classify(read, top_k, call)
            return d.addCallback(lambda found: timed(request, call, self._classify_doc(found)))

        return self.respond(request, "/v1/classify", work)

    def _classify_doc(self, labels: list[list[Label]]) -> dict[str, Any]:
        info = self._service.info
        return {
            "model": info.name if info else None,
            "results": [
                {"labels": [{"label": x.label, "score": x.score} for x in per_image]}
                for per_image in labels
            ],
        }

    # -- search and items -----------------------------------------------------------------

    @app.route("/v1/search", methods=["POST"])
    def search(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self.call_of(request)
            content_type, body = self.body_of(request)
            query = self._query(request)
            read = lambda: read_search(content_type, body, self._limits, query)  # noqa: E731
            d = self._service.search(read, call)
            return d.addCallback(lambda found: timed(request, call, matches_doc(found)))

        return self.respond(request, "/v1/search", work)

    @app.route("/v1/items", methods=["POST"])
    def add_items(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self.call_of(request)
            content_type, body = self.body_of(request)
            query = self._query(request)
            read = lambda: read_items(content_type, body, self._limits, query)  # noqa: E731
            d = self._service.add(read, call)
            return d.addCallback(lambda ids: timed(request, call, {"added": ids}))

        return self.respond(request, "/v1/items", work)

    @app.route("/v1/items", methods=["GET"])
    def list_items(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            limit = _int_arg(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            cursor = request.args.get(b"cursor", [None])[0]
            before = None if cursor is None else bounded_int(cursor.decode(), "cursor", 1, 2**62)
            d = self._service.page(limit, before)
            return d.addCallback(lambda items: page_doc(items, limit))

        return self.respond(request, "/v1/items", work)

    @app.route("/v1/items/<segment:item_id>/similar", methods=["GET"])
    def similar(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            d = self._service.similar(item_id, search_task(self._query(request)))
            return d.addCallback(lambda matches: matches_doc([matches]))

        return self.respond(request, "/v1/items/{id}/similar", work)

    @app.route("/v1/items/<segment:item_id>/thumbnail", methods=["GET"])
    def thumbnail(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def found(row: tuple[int, bytes | None]) -> Binary:
            fid, jpeg = row
            if jpeg is None:
                raise NotFound(f"item {item_id!r} has no thumbnail (added before thumbnails)")
            return Binary(jpeg, "image/jpeg", f'"{fid}"')

        def work() -> Deferred[Any]:
            return self._service.thumbnail(item_id).addCallback(found)

        return self.respond(request, "/v1/items/{id}/thumbnail", work)

    @app.route("/v1/items/<segment:item_id>", methods=["GET"])
    def get_item(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            return self._service.get(item_id).addCallback(item_json)

        return self.respond(request, "/v1/items/{id}", work)

    @app.route("/v1/items/<segment:item_id>", methods=["DELETE"])
    def delete_item(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            return self._service.delete(item_id).addCallback(lambda _: {"deleted": item_id})

        return self.respond(request, "/v1/items/{id}", work)

    @app.route("/v1/index", methods=["GET"])
    def index(self, request: IRequest) -> Deferred[bytes]:
        return self.respond(request, "/v1/index", self._service.index_info)

    # -- what is loaded, health ---------------------------------------------------------

    @app.route("/v1/model", methods=["GET"])
    def model(self, request: IRequest) -> Deferred[bytes]:
        def work() -> dict[str, Any]:
            return model_json(self._service.loaded())

        return self.respond(request, "/v1/model", work)

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return json_body(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> bytes:
        if self.in_flight.closing:
            request.setHeader(b"Retry-After", b"1")
            return json_body(request, 503, {"status": "shutting down"})
        if not self._service.ready:
            request.setHeader(b"Retry-After", b"5")
            return json_body(request, 503, {"status": "loading"})
        return json_body(request, 200, {"status": "ready"})

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return json_body(request, 200, self._openapi)

    # -- pages for a browser ----------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        return web.respond(request, web.asset("index.html"))

    @app.route("/docs", methods=["GET"])
    def docs(self, request: IRequest) -> bytes:
        if self._docs is None:
            self._docs = web.docs(self._openapi)
        return web.respond(request, self._docs)

    @app.route("/web/<segment:name>", methods=["GET"])
    def asset(self, request: IRequest, name: str) -> bytes:
        found = web.asset(name)
        if found is None:
            return error_body(request, 404, NotFound.code, f"no such file: /web/{name}")
        return web.respond(request, found)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        if not self._metrics_here:
            return error_body(
                request, 404, "not_found", "metrics are served on the metrics address"
            )
        request.setHeader(b"Content-Type", self._metrics.content_type.encode())
        return self._metrics.render()

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        status = error.code or 500
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        valid = allow(request, error)
        if valid:
            method = request.method.decode("latin-1")
            description = f"{method} is not allowed here; allowed: {', '.join(valid)}"
            return error_body(request, status, code, description)
        return error_body(request, status, code, error.description or error.name)


def _int_arg(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name.encode(), [None])[0]
    if raw is None:
        return default
    return bounded_int(raw.decode("utf-8", "replace"), name, low, high)
