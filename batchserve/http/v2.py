"""The Open Inference Protocol v2 routes (KServe / Triton REST) under ``/v2``: server and
model metadata, health, and inference. Inference goes through the same service, batcher,
deadlines, admission, tokens and metrics as ``/v1``; errors are the protocol's
``{"error": "..."}``. The wire format is in v2_wire.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from batchserve.errors import BatchserveError, InvalidInput, NotFound
from batchserve.http import v2_wire
from batchserve.http.bodies import RequestLimits
from batchserve.http.responder import Responder, Work
from batchserve.http.routing import PathSegment
from batchserve.http.wire import Prepared, allow, json_body, retry_after, status_for
from batchserve.models.batches import Prediction
from batchserve.serving.service import Call, ImageService

if TYPE_CHECKING:
    from batchserve.models.spec import ModelInfo

HEADER_LENGTH = b"inference-header-content-length"


def error_body(request: IRequest, error: BatchserveError) -> bytes:
    """The protocol's error: ``{"error": "<message>"}`` with the error's status."""
    retry_after(request, error)
    return json_body(request, status_for(error), {"error": str(error)})


@dataclass(frozen=True)
class InferBody(Prepared):
    """An inference response: JSON, or a JSON header followed by binary tensors."""

    body: bytes
    header_length: int | None

    def write_to(self, request: IRequest) -> bytes:
        kind = b"application/json" if self.header_length is None else b"application/octet-stream"
        request.setHeader(b"Content-Type", kind)
        request.setHeader(b"Content-Length", str(len(self.body)).encode())
        if self.header_length is not None:
            request.setHeader(HEADER_LENGTH, str(self.header_length).encode())
        return self.body


class OpenInferenceAPI:
    """The ``/v2`` routes, answered through ``responder``, as the /v1 routes are."""

    app = Klein()
    app.url_map.converters["segment"] = PathSegment

    def __init__(self, responder: Responder, service: ImageService, limits: RequestLimits) -> None:
        self._responder = responder
        self._service = service
        self._limits = limits

    def resource(self) -> IResource:
        return self.app.resource()

    def _respond(self, request: IRequest, route: str, work: Work) -> Deferred[bytes]:
        return self._responder.respond(request, route, work, errors=error_body)

    @app.route("/v2", methods=["GET"])
    def server(self, request: IRequest) -> Deferred[bytes]:
        return self._respond(request, "/v2", v2_wire.server_metadata)

    @app.route("/v2/health/live", methods=["GET"])
    def live(self, request: IRequest) -> bytes:
        return json_body(request, 200, {"live": True})

    @app.route("/v2/health/ready", methods=["GET"])
    def ready(self, request: IRequest) -> bytes:
        ready = self._service.ready and not self._responder.in_flight.closing
        return json_body(request, 200 if ready else 503, {"ready": ready})

    @app.route("/v2/models/<segment:name>", methods=["GET"])
    @app.route("/v2/models/<segment:name>/versions/<segment:version>", methods=["GET"])
    def model(
        self, request: IRequest, name: str, version: str = v2_wire.VERSION
    ) -> Deferred[bytes]:
        def work() -> dict[str, Any]:
            return v2_wire.model_metadata(self._model(name, version))

        return self._respond(request, "/v2/models/{name}", work)

    @app.route("/v2/models/<segment:name>/ready", methods=["GET"])
    @app.route("/v2/models/<segment:name>/versions/<segment:version>/ready", methods=["GET"])
    def model_ready(
        self, request: IRequest, name: str, version: str = v2_wire.VERSION
    ) -> Deferred[bytes]:
        def work() -> dict[str, Any]:
            self._model(name, version)
            return {"name": name, "ready": self._service.ready}

        return self._respond(request, "/v2/models/{name}/ready", work)

    @app.route("/v2/models/<segment:name>/infer", methods=["POST"])
    @app.route("/v2/models/<segment:name>/versions/<segment:version>/infer", methods=["POST"])
    def infer(
        self, request: IRequest, name: str, version: str = v2_wire.VERSION
    ) -> Deferred[bytes]:
        def work() -> Deferred[InferBody]:
            info = self._model(name, version)
            call = self._responder.call_of(request)
            _, body = self._responder.body_of(request)
            length = _header_length(request)
            read = lambda: v2_wire.read_infer(_bytes(body), length, info, self._limits)  # noqa: E731
            return self._infer(read, call).addCallback(lambda done: InferBody(*done))

        return self._respond(request, "/v2/models/{name}/infer", work)

    def _infer(
        self, read: Callable[[], v2_wire.InferRequest], call: Call
    ) -> Deferred[tuple[bytes, int | None]]:
        """Read the request on the decode pool (once read, its own deadline joins the
        call's), run its images through the model, and write the response."""
        info = self._service.loaded()
        asked: list[v2_wire.InferRequest] = []

        def images() -> list[v2_wire.Image]:
            asked.append(read())
            own = asked[0].timeout_s
            if own is not None:
                call.timeout_s = own if call.timeout_s is None else min(call.timeout_s, own)
            return asked[0].images

        def written(predictions: list[Prediction]) -> tuple[bytes, int | None]:
            return v2_wire.write_infer(info, asked[0], predictions)

        return self._service.predict(images, call).addCallback(written)

    def _model(self, name: str, version: str) -> ModelInfo:
        info = self._service.loaded()
        if name != info.name or version != v2_wire.VERSION:
            raise NotFound(
                f"no model {name!r} version {version}: this server serves "
                f"{info.name!r} version {v2_wire.VERSION}"
            )
        return info

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        allow(request, error)
        return json_body(request, error.code or 500, {"error": error.description or error.name})


def _header_length(request: IRequest) -> int | None:
    raw = request.getHeader(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from e


def _bytes(body: IO[bytes] | bytes) -> bytes:
    return body if isinstance(body, bytes) else body.read()
