"""``AsyncClient``: the API from asyncio code, over one httpx connection pool. The same
calls, retries and errors as ``Client`` (``batchserve.client.sync``), awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


class AsyncClient:
    """As ``Client``, for asyncio: every method is awaited, ``items`` is an async iterator,
    ``sleep`` is awaitable (``asyncio.sleep``), and it closes with ``aclose`` or as an
    async context manager. Calls may run concurrently (``asyncio.gather``) on its pool."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 30.0,
        retries: Retry = session.DEFAULT_RETRY,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._http = httpx.AsyncClient(
            transport=transport, **session.options(url, token, timeout_s)
        )
        self._timeout_s = timeout_s
        self._retries = retries
        self._sleep = sleep
        self._clock = clock

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def embed(self, images: Images, *, timeout_ms: int | None = None) -> Embeddings:
        """As ``Client.embed``: float32 [N, dim]."""
        return await self._send(calls.embed(images, timeout_ms))

    async def classify(
        self, images: Images, k: int = 5, *, timeout_ms: int | None = None
    ) -> list[list[Label]]:
        """As ``Client.classify``."""
        return await self._send(calls.classify(images, k, timeout_ms))

    async def search(
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
        """As ``Client.search``: by images or by vectors, exactly one."""
        params = calls.filters(k, label, same_class, min_score, verify)
        return await self._send(calls.search(images, vectors, params, timeout_ms))

    async def copies(self, images: Images, *, timeout_ms: int | None = None) -> list[list[Match]]:
        """As ``Client.copies``."""
        return await self._send(calls.copies(images, timeout_ms))

    async def add(
        self,
        items: NewItem | Sequence[NewItem] | None = None,
        *,
        id: str | None = None,
        image: ImageSource | None = None,
        label: str | None = None,
        metadata: dict[str, Any] | None = None,
        timeout_ms: int | None = None,
    ) -> list[str]:
        """As ``Client.add``: the ids added, at most 64 items a request."""
        added: list[str] = []
        for call in calls.add(calls.new_items(items, id, image, label, metadata), timeout_ms):
            ids: list[str] = await self._send(call)
            added.extend(ids)
        return added

    async def get(self, item_id: str) -> StoredItem:
        """As ``Client.get``."""
        return await self._send(calls.get(item_id))

    async def similar(
        self,
        item_id: str,
        k: int = 10,
        *,
        label: str | None = None,
        same_class: bool = False,
        min_score: float | None = None,
        verify: bool | None = None,
    ) -> list[Match]:
        """As ``Client.similar``."""
        params = calls.filters(k, label, same_class, min_score, verify)
        return await self._send(calls.similar(item_id, params))

    async def delete(self, item_id: str) -> None:
        """As ``Client.delete``."""
        await self._send(calls.delete(item_id))

    async def items(self, limit: int = 50) -> AsyncIterator[StoredItem]:
        """As ``Client.items``: ``async for item in client.items()``."""
        cursor: str | None = None
        while True:
            page = await self._send(calls.items_page(limit, cursor))
            for item in page.items:
                yield item
            if page.next is None:
                return
            cursor = page.next

    async def thumbnail(self, item_id: str) -> bytes:
        """As ``Client.thumbnail``."""
        return await self._send(calls.thumbnail(item_id))

    async def index_info(self) -> dict[str, Any]:
        """As ``Client.index_info``."""
        return await self._send(calls.index_info())

    async def model(self) -> dict[str, Any]:
        """As ``Client.model``."""
        return await self._send(calls.model())

    async def metrics(self) -> str:
        """As ``Client.metrics``."""
        return await self._send(calls.metrics())

    async def healthy(self) -> bool:
        """As ``Client.healthy``."""
        return await self._send(calls.healthy())

    async def ready(self) -> bool:
        """As ``Client.ready``: True on 200, False on 503."""
        return await self._send(calls.ready())

    async def wait_ready(self, timeout_s: float, poll_s: float = 0.1) -> None:
        """As ``Client.wait_ready``."""
        deadline = self._clock() + timeout_s
        while True:
            try:
                if await self._send(calls.ready(), session.ONCE):
                    return
                failure: Exception = session.not_ready(self.url, timeout_s)
            except ConnectionFailed as e:
                failure = e
            if self._clock() >= deadline:
                raise failure
            await self._sleep(poll_s)

    async def _send(self, call: Call[T], retries: Retry | None = None) -> T:
        policy = self._retries if retries is None else retries
        attempt = 1
        while True:
            outcome = await self._attempt(call)
            answered = call.answered(outcome)
            delay = None if answered else next_delay_s(policy, attempt, outcome, call.repeatable)
            if delay is None:
                return call.result(outcome)
            await self._sleep(delay)
            attempt += 1

    async def _attempt(self, call: Call[T]) -> Outcome:
        try:
            return await self._http.send(call.request(self._http, self._timeout_s))
        except httpx.TransportError as failure:
            return failure
