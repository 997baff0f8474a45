"""Every API call as data, written once for the sync and the async client: the request to
send (built afresh for each attempt, so that a retry sends the same thing again) and how to
read its answer. The clients only send, retry and sleep."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from batchserve.client.errors import connection_error, error_for
from batchserve.client.records import (
    Label,
    Match,
    NewItem,
    Page,
    StoredItem,
    label_of,
    match_of,
    page_of,
    stored_item_of,
)
from batchserve.client.retry import Outcome
from batchserve.client.uploads import FilePart, ImageSource, as_list, image_part, image_parts

T = TypeVar("T")

#: The most items one add request carries (the server's default max_images_per_request);
#: longer lists go in several requests.
MAX_ITEMS_PER_REQUEST = 64
#: Time beyond a call's own ``timeout_ms`` to wait for the server's answer (its 504).
DEADLINE_GRACE_S = 1.0

Vectors = npt.ArrayLike
Embeddings = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and the reading of its answer. ``repeatable``: safe to send again
    when the connection broke after it may have been sent. ``accept``: the statuses that
    are answers to ``read`` (any other is an error). ``wait_s``: the least time to wait for
    the answer, for calls given a longer deadline than the client's timeout."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Mapping[str, str] = field(default_factory=dict)
    files: Sequence[FilePart] = ()
    data: Mapping[str, list[str]] = field(default_factory=dict)
    json: Any = None
    repeatable: bool = True
    accept: frozenset[int] = frozenset({200})
    wait_s: float = 0.0

    def request(self, http: httpx.Client | httpx.AsyncClient, timeout_s: float) -> httpx.Request:
        """The request for one attempt, on ``http``'s base URL and headers."""
        extra: dict[str, Any] = {}
        if self.wait_s > timeout_s:
            extra["timeout"] = self.wait_s
        return http.build_request(
            self.method,
            self.path,
            params=dict(self.params),
            files=list(self.files) or None,
            data=dict(self.data) or None,
            json=self.json,
            **extra,
        )

    def answered(self, outcome: Outcome) -> bool:
        return isinstance(outcome, httpx.Response) and outcome.status_code in self.accept

    def result(self, outcome: Outcome) -> T:
        """What the call returns for the last attempt's ``outcome``, or the error it raises."""
        if isinstance(outcome, httpx.TransportError):
            raise connection_error(outcome) from outcome
        if outcome.status_code in self.accept:
            return self.read(outcome)
        raise error_for(outcome)


# -- reading answers --------------------------------------------------------------------


def read_embeddings(response: httpx.Response) -> Embeddings:
    """float32 [N, dim], one row per image in the order sent."""
    doc = response.json()
    rows = [r["embedding"] for r in doc["results"]]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), int(doc["dim"]))


def read_labels(response: httpx.Response) -> list[list[Label]]:
    return [[label_of(d) for d in r["labels"]] for r in response.json()["results"]]


def read_matches(response: httpx.Response) -> list[list[Match]]:
    return [[match_of(d) for d in r["matches"]] for r in response.json()["results"]]


def read_json(response: httpx.Response) -> dict[str, Any]:
    doc: dict[str, Any] = response.json()
    return doc


def is_ok(response: httpx.Response) -> bool:
    return response.status_code == 200


# -- building requests ------------------------------------------------------------------


def item_path(item_id: str, *rest: str) -> str:
    """The path of an item: its id as one segment, every reserved character (``/`` too)
    percent-encoded, so that id ``a/b`` is ``/v1/items/a%2Fb``."""
    if not item_id:
        raise ValueError("an item id must not be empty")
    return "/".join(("/v1/items", quote(item_id, safe=""), *rest))


def deadline(timeout_ms: int | None) -> dict[str, str]:
    """The query parameter that shortens (or, up to the server's cap, sets) a request's
    deadline."""
    return {} if timeout_ms is None else {"timeout_ms": str(int(timeout_ms))}


def wait_for(timeout_ms: int | None) -> float:
    return 0.0 if timeout_ms is None else timeout_ms / 1000 + DEADLINE_GRACE_S


def filters(
    k: int,
    label: str | None,
    same_class: bool,
    min_score: float | None,
    verify: bool | None = None,
) -> dict[str, str]:
    """The query parameters of a search; defaults the server has are left out (``verify``
    None: the server's)."""
    params = {"k": str(k)}
    if verify is not None:
        params["verify"] = "true" if verify else "false"
    if label is not None:
        params["label"] = label
    if same_class:
        params["same_class"] = "true"
    if min_score is not None:
        params["min_score"] = repr(float(min_score))
    return params


def images_call(
    path: str,
    read: Callable[[httpx.Response], T],
    images: ImageSource | Sequence[ImageSource],
    params: Mapping[str, str],
    timeout_ms: int | None,
) -> Call[T]:
    """A POST of images (multipart, field ``image``); safe to repeat, as it stores nothing."""
    return Call(
        "POST",
        path,
        read,
        params={**params, **deadline(timeout_ms)},
        files=image_parts(as_list(images)),
        wait_s=wait_for(timeout_ms),
    )


def embed(images: ImageSource | Sequence[ImageSource], timeout_ms: int | None) -> Call[Embeddings]:
    return images_call("/v1/embed", read_embeddings, images, {}, timeout_ms)


def classify(
    images: ImageSource | Sequence[ImageSource], k: int, timeout_ms: int | None
) -> Call[list[list[Label]]]:
    return images_call("/v1/classify", read_labels, images, {"k": str(k)}, timeout_ms)


def query_vectors(vectors: Vectors) -> list[list[float]]:
    """Query vectors as JSON rows: one vector [dim] or several [N, dim]."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"vectors must be [dim] or [N, dim], got shape {array.shape}")
    rows: list[list[float]] = array.tolist()
    return rows


def search(
    images: ImageSource | Sequence[ImageSource] | None,
    vectors: Vectors | None,
    params: Mapping[str, str],
    timeout_ms: int | None,
) -> Call[list[list[Match]]]:
    """A search by images (multipart) or by vectors (JSON), exactly one of them."""
    if images is not None and vectors is None:
        return images_call("/v1/search", read_matches, images, params, timeout_ms)
    if vectors is not None and images is None:
        return Call(
            "POST",
            "/v1/search",
            read_matches,
            params={**params, **deadline(timeout_ms)},
            json={"vectors": query_vectors(vectors)},
            wait_s=wait_for(timeout_ms),
        )
    raise ValueError("search takes images or vectors: exactly one of them")


def read_copies(response: httpx.Response) -> list[list[Match]]:
    return [[match_of(d) for d in r["copies"]] for r in response.json()["results"]]


def copies(
    images: ImageSource | Sequence[ImageSource], timeout_ms: int | None
) -> Call[list[list[Match]]]:
    return images_call("/v1/duplicates", read_copies, images, {}, timeout_ms)


def new_items(
    items: NewItem | Sequence[NewItem] | None,
    id: str | None,
    image: ImageSource | None,
    label: str | None,
    metadata: dict[str, Any] | None,
) -> list[NewItem]:
    """The items of an add: ``items`` (one ``NewItem`` or a sequence of them), or one item
    from keyword arguments (``id`` and ``image``, with ``label`` and ``metadata``)."""
    if items is None:
        if id is None or image is None:
            raise TypeError("add takes items, or id= and image= for one item")
        return [NewItem(id, image, label, metadata)]
    if any(v is not None for v in (id, image, label, metadata)):
        raise TypeError("add takes items or id= and image= (label=, metadata=), not both")
    found = [items] if isinstance(items, NewItem) else list(items)
    strays = [type(i).__name__ for i in found if not isinstance(i, NewItem)]
    if strays:
        raise TypeError(f"add takes NewItem items, got {', '.join(strays)}")
    return found


def add(items: Sequence[NewItem], timeout_ms: int | None) -> list[Call[list[str]]]:
    """Multipart adds of at most MAX_ITEMS_PER_REQUEST items each. Every item gets its own
    ``id``, ``label`` and ``metadata`` field, empty for none (the server reads an empty
    label as none and empty metadata as ``{}``). Not repeatable: a repeat would replace the
    items again, with a new ``created``."""
    chunks = [
        items[start : start + MAX_ITEMS_PER_REQUEST]
        for start in range(0, len(items), MAX_ITEMS_PER_REQUEST)
    ]
    return [add_chunk(chunk, timeout_ms) for chunk in chunks]


def add_chunk(items: Sequence[NewItem], timeout_ms: int | None) -> Call[list[str]]:
    fields: dict[str, list[str]] = {
        "id": [i.id for i in items],
        "label": [i.label or "" for i in items],
        "metadata": [json.dumps(i.metadata) if i.metadata else "" for i in items],
    }
    return Call(
        "POST",
        "/v1/items",
        lambda response: [str(i) for i in response.json()["added"]],
        params=deadline(timeout_ms),
        files=[image_part(item.image, n) for n, item in enumerate(items)],
        data=fields,
        repeatable=False,
        wait_s=wait_for(timeout_ms),
    )


def get(item_id: str) -> Call[StoredItem]:
    return Call("GET", item_path(item_id), lambda r: stored_item_of(r.json()))


def similar(item_id: str, params: Mapping[str, str]) -> Call[list[Match]]:
    return Call("GET", item_path(item_id, "similar"), lambda r: read_matches(r)[0], params=params)


def delete(item_id: str) -> Call[None]:
    """Not repeatable: were the first delete done, a repeat would report NotFound."""
    return Call("DELETE", item_path(item_id), lambda r: None, repeatable=False)


def items_page(limit: int, cursor: str | None) -> Call[Page]:
    params = {"limit": str(limit)} | ({} if cursor is None else {"cursor": cursor})
    return Call("GET", "/v1/items", lambda r: page_of(r.json()), params=params)


def thumbnail(item_id: str) -> Call[bytes]:
    return Call("GET", item_path(item_id, "thumbnail"), lambda r: r.content)


def index_info() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/index", read_json)


def model() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/model", read_json)


def metrics() -> Call[str]:
    return Call("GET", "/metrics", lambda r: r.text)


def ready() -> Call[bool]:
    """``GET /readyz``: a 503 is an answer here (not ready yet), not an error to retry."""
    return Call("GET", "/readyz", is_ok, accept=frozenset({200, 503}))


def healthy() -> Call[bool]:
    return Call("GET", "/healthz", is_ok, accept=frozenset({200, 503}))
