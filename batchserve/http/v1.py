"""The /v1 routes of the API, and the root resource that serves them beside the /v2 routes;
admission, deadlines, errors and metrics are the Responder's (responder.py), the wire
format is in wire.py, the pages in web.py.

Every /v1 answer is JSON; every error is ``{"error": {"code": ..., "message": ...}}``.
Handlers do no blocking work: bodies are read and images decoded on the decode pool and
run on the inference thread by the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from batchserve.errors import NotFound
from batchserve.http import web
from batchserve.http.auth import Tokens
from batchserve.http.bodies import RequestLimits, read_images
from batchserve.http.drain import InFlight, close_after_response
from batchserve.http.inputs import (
    DEFAULT_PAGE,
    DEFAULT_TOP_K,
    MAX_K,
    MAX_PAGE,
    bounded_int,
    read_items,
    read_search,
    search_task,
)
from batchserve.http.openapi import docs_page
from batchserve.http.openapi import document as openapi
from batchserve.http.pacing import RefusalPacer
from batchserve.http.responder import ApiMetrics, Responder
from batchserve.http.routing import PathSegment, Utf8URLs
from batchserve.http.v2 import OpenInferenceAPI
from batchserve.http.wire import (
    Binary,
    allow,
    copies_doc,
    error_body,
    index_json,
    item_json,
    json_body,
    matches_doc,
    model_json,
    page_doc,
    timed,
)
from batchserve.serving.records import Label
from batchserve.serving.service import ImageService
from batchserve.storage.outage import CatalogHealth


class BatchserveAPI:
    """The /v1 routes (a Klein application) and the pages; ``resource()`` is the root
    resource to serve, /v2 included. Both answer through one Responder."""

    app = Klein()
    app.url_map.converters["segment"] = PathSegment

    def __init__(
        self,
        service: ImageService,
        metrics: ApiMetrics,
        limits: RequestLimits,
        tokens: Tokens | None = None,
        metrics_here: bool = True,
        pacer: RefusalPacer | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._limits = limits
        self._metrics_here = metrics_here
        self._openapi = openapi.document(limits)
        self._docs: web.Asset | None = None
        known_params = openapi.query_parameters(self._openapi)
        self._responder = Responder(
            service, metrics, limits, tokens or Tokens(), known_params, pacer
        )
        self.in_flight: InFlight = self._responder.in_flight

    def resource(self) -> IResource:
        """The root resource: these routes, and the /v2 routes under ``/v2``."""
        v2 = OpenInferenceAPI(self._responder, self._service, self._limits)
        return Utf8URLs(self.app.resource(), {b"v2": v2.resource()})

    def refuse_early(
        self, request: IRequest, method: bytes, path: bytes
    ) -> Callable[[IRequest], None] | None:
        """How to answer a request at once from its headers, or None (see
        ``Responder.refuse_early``): the site calls it before reading a body."""
        return self._responder.refuse_early(request, method, path)

    # -- inference ----------------------------------------------------------------------

    @app.route("/v1/embed", methods=["POST"])
    def embed(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self._responder.call_of(request)
            content_type, body = self._responder.body_of(request)
            d = self._service.embed(lambda: read_images(content_type, body, self._limits), call)
            return d.addCallback(lambda found: timed(request, call, self._embed_doc(found)))

        return self._responder.respond(request, "/v1/embed", work)

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
            call = self._responder.call_of(request)
            top_k = _int_arg(request, "k", DEFAULT_TOP_K, 1, MAX_K)
            content_type, body = self._responder.body_of(request)
            read = lambda: read_images(content_type, body, self._limits)  # noqa: E731
            d = self._service.classify(read, top_k, call)
            return d.addCallback(lambda found: timed(request, call, self._classify_doc(found)))

        return self._responder.respond(request, "/v1/classify", work)

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
            call = self._responder.call_of(request)
            content_type, body = self._responder.body_of(request)
            query = self._responder.query_of(request)
            read = lambda: read_search(content_type, body, self._limits, query)  # noqa: E731
            d = self._service.search(read, call)
            return d.addCallback(lambda found: timed(request, call, matches_doc(found)))

        return self._responder.respond(request, "/v1/search", work)

    @app.route("/v1/duplicates", methods=["POST"])
    def duplicates(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self._responder.call_of(request)
            content_type, body = self._responder.body_of(request)
            read = lambda: read_images(content_type, body, self._limits)  # noqa: E731
            d = self._service.copies(read, call)
            return d.addCallback(lambda found: timed(request, call, copies_doc(found)))

        return self._responder.respond(request, "/v1/duplicates", work)

    @app.route("/v1/items", methods=["POST"])
    def add_items(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            call = self._responder.call_of(request)
            content_type, body = self._responder.body_of(request)
            query = self._responder.query_of(request)
            read = lambda: read_items(content_type, body, self._limits, query)  # noqa: E731
            d = self._service.add(read, call)
            return d.addCallback(lambda ids: timed(request, call, {"added": ids}))

        return self._responder.respond(request, "/v1/items", work)

    @app.route("/v1/items", methods=["GET"])
    def list_items(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            limit = _int_arg(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            cursor = request.args.get(b"cursor", [None])[0]
            before = None if cursor is None else bounded_int(cursor.decode(), "cursor", 1, 2**62)
            d = self._service.page(limit, before)
            return d.addCallback(lambda items: page_doc(items, limit))

        return self._responder.respond(request, "/v1/items", work)

    @app.route("/v1/items/<segment:item_id>/similar", methods=["GET"])
    def similar(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            d = self._service.similar(item_id, search_task(self._responder.query_of(request)))
            return d.addCallback(lambda matches: matches_doc([matches]))

        return self._responder.respond(request, "/v1/items/{id}/similar", work)

    @app.route("/v1/items/<segment:item_id>/thumbnail", methods=["GET"])
    def thumbnail(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def found(row: tuple[int, bytes | None]) -> Binary:
            fid, jpeg = row
            if jpeg is None:
                raise NotFound(f"item {item_id!r} has no thumbnail (added before thumbnails)")
            return Binary(jpeg, "image/jpeg", f'"{fid}"')

        def work() -> Deferred[Any]:
            return self._service.thumbnail(item_id).addCallback(found)

        return self._responder.respond(request, "/v1/items/{id}/thumbnail", work)

    @app.route("/v1/items/<segment:item_id>", methods=["GET"])
    def get_item(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            return self._service.get(item_id).addCallback(item_json)

        return self._responder.respond(request, "/v1/items/{id}", work)

    @app.route("/v1/items/<segment:item_id>", methods=["DELETE"])
    def delete_item(self, request: IRequest, item_id: str) -> Deferred[bytes]:
        def work() -> Deferred[Any]:
            return self._service.delete(item_id).addCallback(lambda _: {"deleted": item_id})

        return self._responder.respond(request, "/v1/items/{id}", work)

    @app.route("/v1/index", methods=["GET"])
    def index(self, request: IRequest) -> Deferred[bytes]:
        def work() -> Deferred[dict[str, Any]]:
            return self._service.index_info().addCallback(index_json)

        return self._responder.respond(request, "/v1/index", work)

    # -- what is loaded, health ---------------------------------------------------------

    @app.route("/v1/model", methods=["GET"])
    def model(self, request: IRequest) -> Deferred[bytes]:
        def work() -> dict[str, Any]:
            return model_json(self._service.loaded())

        return self._responder.respond(request, "/v1/model", work)

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return json_body(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> bytes:
        """200 ``{"status": "ready"}`` once the model is warm and the index open; 503 while
        loading, rebuilding or shutting down. With a shared catalog (PostgreSQL) the body
        also says how the replica last found it: ``"catalog": "ok"``, or ``"catalog":
        "unavailable"`` and ``"catalog_reason"`` (a few words: "no answer within 7 s",
        "connection refused"; its address stays in the log). An unavailable catalog keeps
        /readyz at 200: searches and reads by id go on from memory, so the replica stays in
        the load balancer, and only its writes get 503 with Retry-After. With the embedded
        SQLite catalog, which is never out of reach, there is no ``catalog`` field."""
        if self.in_flight.closing:
            request.setHeader(b"Retry-After", b"1")
            close_after_response(request)
            return json_body(request, 503, {"status": "shutting down"})
        catalog = _catalog_fields(self._service.catalog_health)
        if not self._service.ready:
            request.setHeader(b"Retry-After", b"5")
            rebuilding = self._service.index_state == "rebuilding"
            status = "rebuilding" if rebuilding else "loading"
            return json_body(request, 503, {"status": status, **catalog})
        return json_body(request, 200, {"status": "ready", **catalog})

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
            self._docs = web.Asset(docs_page.render(self._openapi), web.TYPES[".html"])
        return web.respond(request, self._docs)

    @app.route("/web/<segment:name>", methods=["GET"])
    def asset(self, request: IRequest, name: str) -> bytes:
        found = web.asset(name)
        if found is None:
            return error_body(request, 404, NotFound.code, f"no such file: /web/{name}")
        return web.respond(request, found)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes | Deferred[bytes]:
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
        return error_body(
            request, status, code, _not_found_hint(request, status) or description_of(error)
        )


def _catalog_fields(health: CatalogHealth | None) -> dict[str, str]:
    """/readyz's fields on a shared catalog (none for the embedded one)."""
    if health is None:
        return {}
    if health.reachable:
        return {"catalog": "ok"}
    return {"catalog": "unavailable", "catalog_reason": health.reason or "unknown"}


def description_of(error: HTTPException) -> str:
    return error.description or error.name


#: The prefix of the routes that end in an item id.
_ITEM_ROUTE = b"/v1/items/"


def _not_found_hint(request: IRequest, status: int) -> str | None:
    """For a 404 on a path that reads as an item id with a ``/`` in it (``GET
    /v1/items/sample/cat``), how to send such an id; None otherwise."""
    path = request.path
    if status != 404 or not path.startswith(_ITEM_ROUTE):
        return None
    rest = path[len(_ITEM_ROUTE) :].decode("utf-8", "replace")
    for suffix in ("/similar", "/thumbnail"):
        rest = rest.removesuffix(suffix)
    if "/" not in rest:
        return None
    encoded = rest.replace("/", "%2F")
    return (
        f"no route for {path.decode('utf-8', 'replace')}: an id with a '/' in it goes in the "
        f"path with the '/' written as %2F (/v1/items/{encoded})"
    )


def _int_arg(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name.encode(), [None])[0]
    if raw is None:
        return default
    return bounded_int(raw.decode("utf-8", "replace"), name, low, high)
