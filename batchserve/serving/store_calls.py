"""The service's calls on the item store: searches by vector, similar items, reads,
deletes, pages, thumbnails and the index's description.

Each runs on the store thread only (the one thread that owns the ItemStore), sent there by
``StoreWorker.call(fn, *args)`` as ``fn(store, *args)``; the service gets a Deferred that
fires on the reactor. No Twisted here: plain functions of the store.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from batchserve.errors import NotFound, NotReady
from batchserve.serving.records import SearchTask
from batchserve.storage.records import Item, Match
from batchserve.storage.store import IndexState, ItemStore, SearchQuery


def search_vectors(
    store: ItemStore, queries: npt.NDArray[np.float32], task: SearchTask
) -> list[list[Match]]:
    """The nearest items of each unit query vector ([N, dim] float32), in one search."""
    return store.search([SearchQuery(q, task.k, task.min_score, task.label) for q in queries])


def similar(store: ItemStore, item_id: str, task: SearchTask) -> list[Match]:
    """The nearest items of a stored item, itself excluded; NotFound when there is none.
    Its vector is read from the catalog (the index gives no vector back), so with a
    shared catalog out of reach this is NotReady (503), as writes are."""
    found = store.catalog.get(item_id)
    vector = store.embedding(item_id)
    if found is None or vector is None:
        raise NotFound(f"no item with id {item_id!r}")
    klass = found.predicted_class if task.same_class else None
    query = SearchQuery(vector, task.k, task.min_score, task.label, klass, exclude=item_id)
    return store.search([query])[0]


def local_features(
    store: ItemStore, fids: list[int], item_id: str | None = None
) -> tuple[bytes | None, dict[int, bytes]]:
    """For a verified search: the packed local features of the item ``item_id`` (the query
    of similar items; None: none, or no item) and of the rows ``fids`` that have them (a
    search's matches). With a shared catalog out of reach, none: the search goes on, its
    matches unverified."""
    try:
        query = None
        if item_id is not None:
            found = store.catalog.get(item_id)
            query = None if found is None else store.local_features([found.fid]).get(found.fid)
        return query, store.local_features(fids)
    except NotReady:
        return None, {}


def get(store: ItemStore, item_id: str) -> Item:
    """The item ``item_id``; NotFound when there is none. With a shared catalog out of
    reach, the record the store keeps in memory (``ItemStore.get``)."""
    item = store.get(item_id)
    if item is None:
        raise NotFound(f"no item with id {item_id!r}")
    return item


def delete(store: ItemStore, item_id: str) -> bool:
    if not store.delete(item_id):
        raise NotFound(f"no item with id {item_id!r}")
    return True


def page(store: ItemStore, limit: int, before: int | None) -> list[Item]:
    """Up to ``limit`` items, newest first, older than row ``before``: from the catalog
    only (503 while a shared one is out of reach), as a page from memory would cost a scan
    of every item on the store thread, which searches wait for."""
    return store.catalog.page(limit, before)


def thumbnail(store: ItemStore, item_id: str) -> tuple[int, bytes | None]:
    """(the item's row, its thumbnail JPEG or None); NotFound when there is no item."""
    found = store.catalog.thumbnail(item_id)
    if found is None:
        raise NotFound(f"no item with id {item_id!r}")
    return found


def describe(store: ItemStore) -> IndexState:
    """The index's kind, size, dimension and device."""
    return store.describe()
