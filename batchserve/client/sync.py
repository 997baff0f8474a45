"""``Client``: the API from ordinary (blocking) code, over one httpx connection pool."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self, TypeVar

import httpx

from batchserve.client import calls, session
from batchserve.client.calls import Call, Embeddings, Vectors
from batchserve.client.errors import ConnectionFailed
from batchserve.client.records import Label, Match, NewItem, StoredItem
from batchserve.client.retry import Outcome, Retry, next_delay_s
from batchserve.client.uploads import ImageSource

T = TypeVar("T")
Images = ImageSource | Sequence[ImageSource]


class Client:
    """A batchserve server at ``url`` (``http://127.0.0.1:8080``). ``token`` goes in every
    request as ``Authorization: Bearer``; ``timeout_s`` bounds each wait on the network;
    ``retries`` says when a call is tried again. ``transport`` (an httpx transport: a
    ``MockTransport`` in tests) and ``sleep`` / ``clock`` (seconds) replace the real ones.

    Every image argument takes one image or a sequence of them (bytes, a path, a binary
    file); the answer always has one row or list per image. Errors the API answers raise
    ``BatchserveError`` subclasses; no answer raises ``ConnectionFailed``. Close it, or use
    it as a context manager.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 30.0,
        retries: Retry = session.DEFAULT_RETRY,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._http = httpx.Client(transport=transport, **session.options(url, token, timeout_s))
        self._timeout_s = timeout_s
        self._retries = retries
        self._sleep = sleep
        self._clock = clock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def embed(self, images: Images, *, timeout_ms: int | None = None) -> Embeddings:
        """The embedding of each image: float32 [N, dim], L2-normalised, in order."""
        return self._send(calls.embed(images, timeout_ms))

    def classify(
        self, images: Images, k: int = 5, *, timeout_ms: int | None = None
    ) -> list[list[Label]]:
        """The ``k`` most likely classes of each image, most likely first."""
        return self._send(calls.classify(images, k, timeout_ms))

    def search(
        self,
        images: Images | None = None,
        *,
        vectors: Vectors | None = None,
        k: int = 10,
        label: str | None = None,
        same_class: bool = False,
        min_score: float | None = None,
        verify: bool | None = None,
        timeout_ms: int | None = None,
    ) -> list[list[Match]]:
        """The ``k`` items most similar to each image, or to each of ``vectors`` ([dim] or
        [N, dim]): exactly one of the two. ``label`` and ``same_class`` narrow the search;
        ``min_score`` is the least cosine similarity. ``verify`` (images only; None: the
        server's default) verifies the embedding's shortlist by local features: verified
        copies first, each match with ``verified``, ``inliers`` and ``transform``."""
        params = calls.filters(k, label, same_class, min_score, verify)
        return self._send(calls.search(images, vectors, params, timeout_ms))

    def copies(self, images: Images, *, timeout_ms: int | None = None) -> list[list[Match]]:
        """Each image's stored copies, proven by local features (``POST /v1/duplicates``),
        those that hold more of it first: ``verified`` matches with their ``inliers`` and
        ``transform``; an empty list for an image with none."""
        return self._send(calls.copies(images, timeout_ms))

    def add(
        self,
        items: NewItem | Sequence[NewItem] | None = None,
        *,
        id: str | None = None,
        image: ImageSource | None = None,
        label: str | None = None,
        metadata: dict[str, Any] | None = None,
        timeout_ms: int | None = None,
    ) -> list[str]:
        """Add items (an existing id is replaced), durably; the ids added, in order. One
        ``NewItem``, a sequence of them, or one item as ``id=``, ``image=`` (``label=``,
        ``metadata=``). Up to 64 items go in one request, more in several: an error in a
        later request leaves the earlier ones added."""
        added: list[str] = []
        for call in calls.add(calls.new_items(items, id, image, label, metadata), timeout_ms):
            ids: list[str] = self._send(call)
            added.extend(ids)
        return added

    def get(self, item_id: str) -> StoredItem:
        """The stored item ``item_id`` (``NotFound`` if there is none)."""
        return self._send(calls.get(item_id))

    def similar(
        self,
        item_id: str,
        k: int = 10,
        *,
        label: str | None = None,
        same_class: bool = False,
        min_score: float | None = None,
        verify: bool | None = None,
    ) -> list[Match]:
        """The ``k`` items most similar to stored item ``item_id``, itself left out;
        ``verify`` as for ``search``, against the item's stored local features."""
        params = calls.filters(k, label, same_class, min_score, verify)
        return self._send(calls.similar(item_id, params))

    def delete(self, item_id: str) -> None:
        """Delete the item ``item_id`` (``NotFound`` if there is none)."""
        self._send(calls.delete(item_id))

    def items(self, limit: int = 50) -> Iterator[StoredItem]:
        """Every stored item, newest first, fetched ``limit`` at a time as it is read."""
        cursor: str | None = None
        while True:
            page = self._send(calls.items_page(limit, cursor))
            yield from page.items
            if page.next is None:
                return
            cursor = page.next

    def thumbnail(self, item_id: str) -> bytes:
        """The item's JPEG thumbnail (at most 256 px on its longer side)."""
        return self._send(calls.thumbnail(item_id))

    def index_info(self) -> dict[str, Any]:
        """``GET /v1/index``: kind, size, dim, device, calls made, durability."""
        return self._send(calls.index_info())

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``: name, source, input size, dim, classes, ``trained_on``."""
        return self._send(calls.model())

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return self._send(calls.metrics())

    def healthy(self) -> bool:
        """``GET /healthz``: True while the process serves HTTP."""
        return self._send(calls.healthy())

    def ready(self) -> bool:
        """``GET /readyz``: True once the model is loaded and warm, False (503) before it
        and while draining."""
        return self._send(calls.ready())

    def wait_ready(self, timeout_s: float, poll_s: float = 0.1) -> None:
        """Return once the server is ready, polling every ``poll_s`` seconds; after
        ``timeout_s``, raise ``Unavailable`` (it answered, not ready) or
        ``ConnectionFailed`` (it did not answer)."""
        deadline = self._clock() + timeout_s
        while True:
            try:
                if self._send(calls.ready(), session.ONCE):
                    return
                failure: Exception = session.not_ready(self.url, timeout_s)
            except ConnectionFailed as e:
                failure = e
            if self._clock() >= deadline:
                raise failure
            self._sleep(poll_s)

    def _send(self, call: Call[T], retries: Retry | None = None) -> T:
        policy = self._retries if retries is None else retries
        attempt = 1
        while True:
            outcome = self._attempt(call)
            answered = call.answered(outcome)
            delay = None if answered else next_delay_s(policy, attempt, outcome, call.repeatable)
            if delay is None:
                return call.result(outcome)
            self._sleep(delay)
            attempt += 1

    def _attempt(self, call: Call[T]) -> Outcome:
        try:
            return self._http.send(call.request(self._http, self._timeout_s))
        except httpx.TransportError as failure:
            return failure
