"""The API's wire format: the JSON documents of the records, the error body and the
status of each domain error, and the bodies of responses that are not JSON."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from batchserve.errors import (
    BatchserveError,
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InternalError,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    StorageFailed,
    Unauthorized,
    UnsupportedMediaType,
)
from batchserve.http import web
from batchserve.serving.service import Call
from batchserve.storage.records import Item, Match
from batchserve.storage.store import ChangeLogState, IndexState

if TYPE_CHECKING:
    from batchserve.models.spec import ModelInfo

log = Logger()

STATUS_BY_ERROR: dict[type[BatchserveError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    Overloaded: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
    InferenceFailed: 500,
    StorageFailed: 500,
}


class Prepared:
    """A response the route wrote itself (not a JSON document): ``write_to`` sets the
    status and headers and returns the body."""

    def write_to(self, request: IRequest) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True)
class Binary(Prepared):
    """A response that is not JSON (a thumbnail), validated by its ETag."""

    body: bytes
    content_type: str
    etag: str

    def write_to(self, request: IRequest) -> bytes:
        """The body, or 304 when the client's copy is current."""
        request.setHeader(b"ETag", self.etag.encode())
        request.setHeader(b"Cache-Control", b"private, no-cache")
        if web.etag_matches(request.getHeader(b"if-none-match"), self.etag):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"Content-Type", self.content_type.encode())
        request.setHeader(b"Content-Length", str(len(self.body)).encode())
        return self.body


def status_for(error: BatchserveError) -> int:
    for kind in type(error).__mro__:
        if kind in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[kind]
    return 500


def api_headers(request: IRequest) -> None:
    """What every answer of the API (not the page or its files) says of itself: its type is
    the one declared, and it is never stored by a browser or a proxy (a Prepared response
    may set its own Cache-Control after this)."""
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cache-Control", b"no-store")


#: What a client gets for a document that cannot be written as JSON (the log has why).
UNENCODABLE = orjson.dumps(
    {"error": {"code": InternalError.code, "message": "the response could not be written as JSON"}}
)


def json_body(request: IRequest, status: int, doc: Any) -> bytes:
    """``doc`` as the JSON response. orjson writes numpy float32 vectors as they are
    (shortest round-tripping text): 64 x 1280 embeddings take ~3.5 ms, not ~29 ms with
    the standard library, on the reactor. A document orjson cannot write (nested past its
    depth, a type it does not know) is a JSON 500 of this response alone."""
    try:
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as e:
        log.error(
            "{path}: the response could not be written as JSON: {error}",
            path=request.path.decode("latin-1"),
            error=e,
        )
        status, body = 500, UNENCODABLE
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    api_headers(request)
    # A known length spares the client chunked decoding (Twisted chunks otherwise).
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return body


def error_body(request: IRequest, status: int, code: str, message: str) -> bytes:
    return json_body(request, status, {"error": {"code": code, "message": message}})


def retry_after(request: IRequest, error: BatchserveError) -> None:
    """A refusal that passes (queue full, loading) says when to try again."""
    if isinstance(error, Overloaded | NotReady):
        request.setHeader(b"Retry-After", str(error.retry_after_s).encode())


def allow(request: IRequest, error: Exception) -> list[str]:
    """The methods a 405's path takes, also set as its ``Allow`` header (none otherwise)."""
    valid = sorted(getattr(error, "valid_methods", None) or [])
    if valid:
        request.setHeader(b"Allow", ", ".join(valid).encode())
    return valid


def domain_error_body(request: IRequest, error: BatchserveError) -> bytes:
    """The response to ``error``: its status, headers and JSON body."""
    retry_after(request, error)
    if isinstance(error, Unauthorized):
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="batchserve"')
    return error_body(request, status_for(error), error.code, str(error))


def model_json(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "source": info.source,
        "trained_on": info.trained_on,
        "input_size": list(info.input_size),
        "dim": info.dim,
        "classes": info.classes,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "preprocess": info.preprocess,
        "device": info.device,
        "backend": info.backend,
        # How an image becomes its embedding: pooling, fit, border trimming, crop views.
        "embedding": info.embedding,
    }


def index_json(state: IndexState) -> dict[str, Any]:
    """The /v1/index document of the store's ``state``."""
    return {
        "kind": state.kind,
        "kind_in_use": state.kind_in_use,
        "size": state.size,
        "vectors_per_item": state.vectors_per_item,
        "dim": state.dim,
        "device": state.device,
        "labels": state.labels,
        "calls": {
            "search": state.search_calls,
            "add": state.add_calls,
            "remove": state.remove_calls,
        },
        "catalog": {
            **state.durability,
            "commits": state.commits,
            "applied_seq": state.applied_seq,
            "behind": state.behind,
            **change_log_json(state.change_log),
        },
    }


def change_log_json(state: ChangeLogState | None) -> dict[str, Any]:
    """A shared catalog's change log as this replica sees it (nothing for SQLite)."""
    if state is None:
        return {}
    return {
        "replica_id": state.replica_id,
        "pruned_seq": state.pruned_seq,
        "rebuilt_behind_horizon": state.rebuilt_behind_horizon,
    }


def match_json(match: Match) -> dict[str, Any]:
    """A match; a verified search's also says whether it is a verified copy (null: its item
    has no local features), with the inliers and the transform's kind."""
    doc = {
        "id": match.id,
        "score": match.score,
        "label": match.label,
        "metadata": match.metadata,
        "class": match.predicted_class,
    }
    if (checked := match.verification) is not None:
        doc.update(verified=checked.verified, inliers=checked.inliers, transform=checked.transform)
    return doc


def item_json(item: Item) -> dict[str, Any]:
    return {
        "id": item.id,
        "label": item.label,
        "metadata": item.metadata,
        "created": rfc3339(item.created),
        "class": item.predicted_class,
    }


def rfc3339(unix_s: float) -> str:
    """A Unix time as RFC 3339 in UTC, to the millisecond: 2026-11-29T21:36:01.123Z."""
    moment = datetime.fromtimestamp(unix_s, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def page_doc(items: list[Item], limit: int) -> dict[str, Any]:
    """A page of items, newest first; ``next`` is the cursor of the following page."""
    more = len(items) == limit
    return {"items": [item_json(i) for i in items], "next": str(items[-1].fid) if more else None}


def timed(request: IRequest, call: Call, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with where the request's time went, in the body and Server-Timing."""
    request.setHeader(b"Server-Timing", call.timings.server_timing().encode())
    return {**doc, "timings_ms": call.timings.as_ms()}


def copies_doc(per_query: list[list[Match]]) -> dict[str, Any]:
    """Each image's verified copies (``POST /v1/duplicates``)."""
    return {"results": [{"copies": [match_json(m) for m in ms]} for ms in per_query]}


def matches_doc(per_query: list[list[Match]]) -> dict[str, Any]:
    return {"results": [{"matches": [match_json(m) for m in ms]} for ms in per_query]}
