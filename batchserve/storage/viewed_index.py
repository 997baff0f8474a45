"""Item views in the index: several rows per item, used by item.

With item views (``models/views.py``), the index holds one row per view, under the id
``fid * VIEW_SLOTS + view`` (view 0 is the whole image); ``ViewedIndex`` keeps that out of
sight of the store, which still adds, removes, filters and finds items by their catalog row
id (fid).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.models.views import VIEW_WEIGHT
from batchserve.storage.index import VectorIndex

#: Index ids reserved per item: enough for the whole image and every view.
VIEW_SLOTS = 8
#: The most results one GPU FAISS search returns (its GPU_MAX_SELECTION_K).
GPU_MAX_ROWS = 2048


def rows_to_fetch(k: int, views: int, device: str) -> int:
    """Index rows to fetch for the top ``k`` items: ``k * (1 + views)``, which holds every
    top item's best view in an exact search; on a GPU at most ``GPU_MAX_ROWS`` (past
    ``k``), so a search for hundreds of items may there miss a few in its tail."""
    rows = k * (1 + views)
    return min(rows, max(k, GPU_MAX_ROWS)) if device == "gpu" else rows


def view_ids(fids: Any, views: int) -> npt.NDArray[np.int64]:
    """The index ids of every view of items ``fids`` [N]: [N * (1 + views)], item-major."""
    fids = np.ascontiguousarray(fids, dtype=np.int64).reshape(-1)
    slots = np.arange(1 + views, dtype=np.int64)
    out: npt.NDArray[np.int64] = (fids[:, None] * VIEW_SLOTS + slots[None, :]).reshape(-1)
    return out


def best_per_item(
    scores: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Hits on views [Q, n], best first, as hits on items [Q, k]: each item once, with its
    best view's score; -1 where fewer than ``k`` items were found."""
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for row in range(len(ids)):
        hit = ids[row] >= 0
        items = ids[row][hit] // VIEW_SLOTS
        _unique, first = np.unique(items, return_index=True)
        first = np.sort(first)[:k]  # a view list is best first: an item's first hit is its best
        out_ids[row, : len(first)] = items[first]
        out_scores[row, : len(first)] = scores[row][hit][first]
    return out_scores, out_ids


class ViewedIndex:
    """A ``VectorIndex`` holding ``1 + views`` rows per item, used by item: ``add`` and
    ``rebuild`` take vectors [N, 1 + views, dim] (the whole image first), ``remove`` and
    ``search``'s ``allowed`` take item ids, ``search`` gives each item once at its best view."""

    def __init__(self, inner: VectorIndex, views: int) -> None:
        if not 0 < 1 + views <= VIEW_SLOTS:
            raise ValueError(f"at most {VIEW_SLOTS - 1} views per item, not {views}")
        self.inner = inner
        self.views = views
        self.dim = inner.dim
        self.params = inner.params
        self.calls: Counter[str] = inner.calls

    @property
    def size(self) -> int:
        """Items (live rows over rows per item)."""
        return self.inner.size // (1 + self.views)

    @property
    def kind(self) -> str:
        """The kind configured, as ``VectorIndex.kind``."""
        return self.inner.kind

    @property
    def kind_in_use(self) -> str:
        """The structure searched now, as ``VectorIndex.kind_in_use``."""
        return self.inner.kind_in_use

    @property
    def trained(self) -> bool:
        """Whether an IVF kind is trained (on rows, six per item with five views)."""
        return self.inner.trained

    @property
    def device(self) -> str:
        return self.inner.device

    def _rows(self, vectors: Any) -> npt.NDArray[np.float32]:
        rows = np.array(vectors, dtype=np.float32)  # a copy: the views are weighed
        if rows.ndim != 3 or rows.shape[1:] != (1 + self.views, self.dim):
            raise ValueError(f"item vectors must be [N, {1 + self.views}, {self.dim}]")
        rows[:, 1:] *= VIEW_WEIGHT
        return rows.reshape(-1, self.dim)

    def add(self, ids: Any, vectors: Any) -> None:
        """Add items ``ids`` [N] with their vectors [N, 1 + views, dim]."""
        self.inner.add(view_ids(ids, self.views), self._rows(vectors))

    def remove(self, ids: Any) -> None:
        """Remove items ``ids`` [N], every view of each."""
        self.inner.remove(view_ids(ids, self.views))

    def rebuild(self, ids: Any, vectors: Any) -> None:
        """Hold exactly items ``ids`` [N] with their vectors [N, 1 + views, dim]."""
        self.inner.rebuild(view_ids(ids, self.views), self._rows(vectors))

    def needs_training(self) -> bool:
        """As ``VectorIndex``, counting rows: ``train_min`` rows are train_min / 6 items."""
        return self.inner.needs_training()

    def needs_rebuild(self) -> bool:
        """As ``VectorIndex``: removed rows past 10% of the rows."""
        return self.inner.needs_rebuild()

    def search(
        self, queries: Any, k: int, allowed: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The top ``k`` items for each query by their best (weighed) view; ``allowed``
        restricts it to those items. In an exact search the best view of the k-th item has
        at most ``(k - 1) * (1 + views)`` rows above it (views of better items), so the top
        ``k * (1 + views)`` rows hold every top item's best view; an approximate kind
        (hnsw, ivf) finds rows as approximately as it finds single vectors."""
        rows = None if allowed is None else view_ids(allowed, self.views)
        fetch = rows_to_fetch(k, self.views, self.device)
        scores, ids = self.inner.search(queries, fetch, rows)
        return best_per_item(scores, ids, k)

    def write(self, path: Path) -> list[int]:
        """Write the rows' index; returns the removed rows still in it (tombstones)."""
        return self.inner.write(path)

    def load(self, path: Path, tombstones: list[int], trained: bool) -> None:
        """Read what ``write`` wrote, with its tombstones (row ids)."""
        self.inner.load(path, tombstones, trained)
