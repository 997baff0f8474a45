"""What an item is in storage: the record of an item to add (``NewItem``), a stored
``Item`` and a search ``Match``, and the checks every id, label and metadata passes before it
is stored, whoever sends it (the API, ``batchserve index``'s sources). Plain frozen
dataclasses; numpy only for the vectors."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from batchserve.errors import InvalidInput, PayloadTooLarge

MAX_ID_CHARS = 256
MAX_LABEL_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024
#: Levels of objects and lists in metadata, the metadata object itself the first. Every
#: response that holds an item's metadata writes it with orjson, which refuses past 254.
MAX_METADATA_DEPTH = 32


@dataclass(frozen=True)
class NewItem:
    """An item to add: ``embedding`` float32 [dim], unit norm."""

    id: str
    embedding: npt.NDArray[np.float32]
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    predicted_class: str | None = None
    thumbnail: bytes | None = None
    #: sha256 (hex) of the file it was indexed from, so a re-run of ``batchserve index``
    #: skips unchanged files; None for items added through the API.
    digest: str | None = None
    #: float32 [views, dim]: the embeddings of its crop views (``--crop-views``), else None.
    views: npt.NDArray[np.float32] | None = None
    #: Its local features, packed (models/keypoints.py), for verified search; None when
    #: they were not made.
    features: bytes | None = None

    @functools.cached_property
    def vectors(self) -> npt.NDArray[np.float32]:
        """What the index holds of it: the embedding [dim], or with item views the
        embedding then the views [1 + views, dim] (made once: the catalog and the index
        both read it)."""
        if self.views is None:
            return self.embedding
        return np.vstack([self.embedding[None, :], self.views]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Item:
    """A stored item: ``fid`` is its row (and FAISS id), ``created`` a Unix time in seconds,
    ``predicted_class`` the model's class when it was added (None without a head)."""

    fid: int
    id: str
    label: str | None
    predicted_class: str | None
    metadata: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Verification:
    """What geometric verification of local features found between a query and a match:
    ``verified`` (a copy: at least the threshold's inliers agree on one transform; None:
    the item has no local features, so it could not be verified), the ``inliers`` and the
    ``transform``'s kind ("similarity", "mirrored similarity", or "none")."""

    verified: bool | None
    inliers: int = 0
    transform: str = "none"


@dataclass(frozen=True)
class Match:
    """A stored item found by a search, with its cosine similarity to the query; ``fid``,
    its catalog row; ``verification`` when the search was verified."""

    id: str
    score: float
    label: str | None
    metadata: dict[str, Any]
    predicted_class: str | None = None
    fid: int = field(default=0, compare=False)
    verification: Verification | None = None


def check_id(value: object) -> str:
    """A valid item id: a non-empty string of at most MAX_ID_CHARS printable characters."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("every item needs an id: a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidInput(f"id is {len(value)} characters; the limit is {MAX_ID_CHARS}")
    if not value.isprintable():
        raise InvalidInput("id must not hold control characters")
    return value


def check_label(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS or not value.isprintable():
        raise InvalidInput(f"label must be a printable string of at most {MAX_LABEL_CHARS}")
    return value


def check_metadata(value: object) -> dict[str, Any]:
    """A JSON object (or its text) of at most MAX_METADATA_BYTES, nested at most
    MAX_METADATA_DEPTH deep."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        if len(value.encode("utf-8")) > MAX_METADATA_BYTES:
            raise PayloadTooLarge(f"metadata is over {MAX_METADATA_BYTES} bytes")
        value = parse_json(value.encode("utf-8"))
    if not isinstance(value, dict):
        raise InvalidInput("metadata must be a JSON object")
    if nested_deeper(value, MAX_METADATA_DEPTH):
        raise InvalidInput(
            f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep (objects and "
            f"lists); the limit is {MAX_METADATA_DEPTH}"
        )
    if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise PayloadTooLarge(f"metadata is over {MAX_METADATA_BYTES} bytes")
    return value


def nested_deeper(value: object, levels: int) -> bool:
    """Whether ``value`` holds objects or lists more than ``levels`` deep (``value`` itself,
    if one, is the first level). Walked without recursion, and no deeper than ``levels + 1``."""
    below: list[tuple[object, int]] = [(value, 1)]
    while below:
        node, depth = below.pop()
        if isinstance(node, dict):
            children: Iterable[object] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > levels:
            return True
        below.extend((child, depth + 1) for child in children)
    return False


def parse_json(body: bytes) -> Any:
    """The JSON document of ``body``: RFC 8259 only (no NaN or Infinity); integers past 64
    bits are read as floats."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"invalid JSON: {e}") from e
