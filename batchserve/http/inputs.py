"""What each route reads from a parsed body, checked: the items to add (ids, labels,
metadata), the search options and the query vectors. Pure functions, run on the decode
pool with the body's parsing (bodies.py); every failure is a domain error (a 4xx)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.http.bodies import (
    IMAGE_KEYS,
    BodySource,
    RequestLimits,
    check_keys,
    decode_b64,
    is_json,
    media_type,
    parse_body,
    read_json,
)
from batchserve.serving.records import AddTask, SearchRequest, SearchTask
from batchserve.storage.records import check_id, check_label, check_metadata

DEFAULT_K = 10
MAX_K = 1000
#: Labels per image that /v1/classify gives unless ``k`` asks for more or fewer.
DEFAULT_TOP_K = 5
#: The shortest deadline a request may ask for: what an idle server needs to read, decode,
#: run and search one request's images with room to spare.
MIN_TIMEOUT_MS = 1000
MAX_TIMEOUT_MS = 3_600_000
DEFAULT_PAGE = 50
MAX_PAGE = 1000

#: The keys of a JSON search: images or vectors, and the search options.
SEARCH_KEYS = IMAGE_KEYS | {"vectors"} | frozenset(SearchTask.__dataclass_fields__)
#: The keys of a JSON body of items, and of each item.
ITEMS_KEYS = frozenset({"items"})
ITEM_KEYS = frozenset({"id", "label", "metadata", "b64"})
#: The multipart text fields of an add, beside its image files.
ITEM_FIELDS = frozenset({"id", "label", "metadata"})


def read_vectors(value: object, limits: RequestLimits) -> list[list[float]]:
    """The query vectors of ``{"vectors": [[x, ...], ...]}``, checked to be a list of lists
    of JSON numbers (not strings, booleans or null; parse_json reads integers past 64 bits
    as floats), at most
    ``limits.max_images`` of them (each is a query, as an image is). Their dimension, and that
    they are finite and non-zero, are for the service to check: it knows the model."""
    if not isinstance(value, list):
        raise InvalidInput('"vectors" must be a list of lists of numbers')
    for i, vector in enumerate(value):
        if not isinstance(vector, list):
            raise InvalidInput(f"vectors[{i}] must be a list of numbers")
        # type() rather than isinstance(): a bool is an int, and not a coordinate.
        kinds = {type(x) for x in vector}
        if not kinds <= {int, float}:
            raise InvalidInput(f"vectors[{i}] must be a list of numbers")
    if len(value) > limits.max_images:
        raise PayloadTooLarge(
            f"{len(value)} vectors in one request; the limit is {limits.max_images}"
        )
    vectors: list[list[float]] = value
    return vectors


def read_items(
    content_type: str | None,
    body: BodySource,
    limits: RequestLimits,
    query: Mapping[str, str],
) -> list[tuple[bytes, AddTask]]:
    """Items to add. Multipart: files ``image`` with fields ``id`` (one per file), ``label``
    and ``metadata`` (one per file, or one for all). JSON: ``{"items": [{"id", "label",
    "metadata", "b64"}]}``, no other key. Raw image: ``?id=...&label=...``."""
    kind = media_type(content_type)
    if is_json(kind):
        doc = read_json(body, limits)
        entries = doc.get("items")
        if not isinstance(entries, list) or not entries:
            raise InvalidInput('JSON body must be {"items": [{"id": ..., "b64": ...}, ...]}')
        check_keys(doc, ITEMS_KEYS, "the JSON body")
        if len(entries) > limits.max_images:
            raise PayloadTooLarge(
                f"{len(entries)} items in one request; the limit is {limits.max_images}"
            )
        items = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InvalidInput(f"items[{i}] must be an object")
            check_keys(entry, ITEM_KEYS, f"items[{i}]")
            image = decode_b64(entry, i, "items")
            if not image:
                raise InvalidInput(f"items[{i}] has an empty image")
            task = AddTask(
                check_id(entry.get("id")),
                check_label(entry.get("label")),
                check_metadata(entry.get("metadata")),
            )
            items.append((image, task))
        return items
    parsed = parse_body(content_type, body, limits, text_fields=ITEM_FIELDS)
    if not parsed.images:
        raise InvalidInput('no image to add (send a file field named "image")')
    n = len(parsed.images)
    fields = dict(parsed.fields)
    for name in ("id", "label", "metadata"):
        if name in query and name not in fields:
            fields[name] = [query[name]]
    ids = fields.get("id", [])
    if len(ids) != n:
        raise InvalidInput(f"{n} image(s) but {len(ids)} id(s): send one id per image")

    def per_image(name: str) -> list[str | None]:
        values = fields.get(name, [])
        if not values:
            return [None] * n
        if len(values) == 1:
            return values * n  # type: ignore[return-value]
        if len(values) != n:
            raise InvalidInput(f"send one {name} for all images or one per image")
        return list(values)

    labels, metadata = per_image("label"), per_image("metadata")
    return [
        (image, AddTask(check_id(i), check_label(label), check_metadata(meta)))
        for image, i, label, meta in zip(parsed.images, ids, labels, metadata, strict=True)
    ]


# -- searches ---------------------------------------------------------------------------


def read_search(
    content_type: str | None,
    body: BodySource,
    limits: RequestLimits,
    query: Mapping[str, str],
) -> SearchRequest:
    """A search: images in any of the three forms, or JSON ``{"vectors": [[...], ...]}``.
    Options (``k``, ``min_score``, ``label``, ``same_class``) come from the JSON body, and
    the query string overrides them; a JSON body holds no other key."""
    parsed = parse_body(content_type, body, limits, SEARCH_KEYS)
    options = dict(parsed.doc or {})
    options.update({k: v for k, v in query.items() if k in SearchTask.__dataclass_fields__})
    task = search_task(options)
    if parsed.doc is not None and "vectors" in parsed.doc:
        if parsed.images:
            raise InvalidInput('send "vectors" or "images", not both')
        return SearchRequest(task, vectors=read_vectors(parsed.doc["vectors"], limits))
    if not parsed.images:
        raise InvalidInput('no image to search with (or send {"vectors": [...]})')
    return SearchRequest(task, images=parsed.images)


def search_task(options: Mapping[str, Any]) -> SearchTask:
    """Search options from the query string or JSON body, validated."""
    k = bounded_int(options.get("k", DEFAULT_K), "k", 1, MAX_K)
    return SearchTask(
        k=k,
        min_score=_min_score(options.get("min_score")),
        label=_label_filter(options.get("label")),
        same_class=_flag(options.get("same_class", False), "same_class"),
        verify=None if options.get("verify") in (None, "") else _flag(options["verify"], "verify"),
    )


def _min_score(raw: object) -> float | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidInput(f"min_score must be a number, got {raw!r}")
    try:
        score = float(raw)
    except (ValueError, OverflowError) as e:
        raise InvalidInput(f"min_score must be a number, got {raw!r}") from e
    if not -1.0 <= score <= 1.0:
        raise InvalidInput("min_score must be between -1 and 1 (cosine similarity)")
    return score


def _label_filter(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidInput("label must be a string")
    return raw


def _flag(raw: object, name: str) -> bool:
    if isinstance(raw, str):
        if raw.lower() not in ("", "0", "1", "true", "false"):
            raise InvalidInput(f"{name} must be true or false")
        return raw.lower() in ("1", "true")
    if not isinstance(raw, bool):
        raise InvalidInput(f"{name} must be true or false")
    return raw


def bounded_int(raw: object, name: str, low: int, high: int) -> int:
    """``raw`` (an integer or its text) as an int in ``[low, high]``."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise InvalidInput(f"{name} must be an integer")
    try:
        value = int(raw)
    except ValueError as e:
        raise InvalidInput(f"{name} must be an integer, got {raw!r}") from e
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}, got {value}")
    return value
