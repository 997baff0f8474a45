"""A Python client of the batchserve HTTP API, sync (``Client``) and asyncio
(``AsyncClient``), on httpx; it needs numpy and httpx only (no TensorFlow, Twisted or
FAISS)::

    from batchserve.client import Client, NewItem

    with Client("http://127.0.0.1:8080", token=None) as client:
        vectors = client.embed(["cat.jpg", "dog.jpg"])  # float32 [2, dim]
        client.add(NewItem("my-cat", "cat.jpg", label="pets"))
        for match in client.search("cat.jpg", k=3)[0]:
            print(match.id, match.score)

API errors raise ``BatchserveError`` subclasses by status, carrying the server's ``code``
and ``message``; a 503 and a failed connection are retried as ``Retry`` says.
"""

from batchserve.client.aio import AsyncClient
from batchserve.client.errors import (
    BatchserveError,
    ConnectionFailed,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServerError,
    TimedOut,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from batchserve.client.records import Label, Match, NewItem, StoredItem
from batchserve.client.retry import Retry
from batchserve.client.sync import Client

__all__ = [
    "AsyncClient",
    "BatchserveError",
    "Client",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Forbidden",
    "InvalidInput",
    "Label",
    "Match",
    "NewItem",
    "NotFound",
    "PayloadTooLarge",
    "Retry",
    "ServerError",
    "StoredItem",
    "TimedOut",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
]
