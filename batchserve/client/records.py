"""What the client hands back (labels, matches, stored items, pages of them) and the one
record it takes in (``NewItem``), read from the API's JSON documents."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from batchserve.client.uploads import ImageSource


@dataclass(frozen=True)
class Label:
    """A class of the model's classifier and its probability (0-1)."""

    label: str
    score: float


@dataclass(frozen=True)
class Match:
    """A stored item found by a search: ``score`` is its cosine similarity to the query
    (-1 to 1), ``predicted_class`` the model's class for it (the API's ``class``). A
    verified search's (``verify=True``) also has ``verified`` (a copy of the query, proven
    by local features; None: the item has none, or the search did not verify),
    ``inliers`` and ``transform`` (None unless verified)."""

    id: str
    score: float
    label: str | None
    metadata: dict[str, Any]
    predicted_class: str | None
    verified: bool | None = None
    inliers: int | None = None
    transform: str | None = None


@dataclass(frozen=True)
class StoredItem:
    """A stored item: ``created`` is when it was added (aware, UTC), ``predicted_class``
    the model's class for it (the API's ``class``)."""

    id: str
    label: str | None
    metadata: dict[str, Any]
    created: datetime
    predicted_class: str | None


@dataclass(frozen=True)
class NewItem:
    """An item to add: an image (bytes, a path or a binary file) stored under ``id``; an
    item of that id already there is replaced. ``metadata`` is any JSON object."""

    id: str
    image: ImageSource
    label: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Page:
    """One page of ``GET /v1/items``, newest first; ``next`` is the cursor of the next
    page (None on the last)."""

    items: list[StoredItem]
    next: str | None


def label_of(doc: dict[str, Any]) -> Label:
    return Label(str(doc["label"]), float(doc["score"]))


def match_of(doc: dict[str, Any]) -> Match:
    return Match(
        str(doc["id"]),
        float(doc["score"]),
        doc["label"],
        doc["metadata"],
        doc["class"],
        doc.get("verified"),
        doc.get("inliers"),
        doc.get("transform"),
    )


def stored_item_of(doc: dict[str, Any]) -> StoredItem:
    # RFC 3339 with a "Z": datetime.fromisoformat reads it from Python 3.11 on.
    created = datetime.fromisoformat(doc["created"])
    return StoredItem(str(doc["id"]), doc["label"], doc["metadata"], created, doc["class"])


def page_of(doc: dict[str, Any]) -> Page:
    return Page([stored_item_of(d) for d in doc["items"]], doc["next"])
