"""Item views: database-side augmentation of stored items.

With ``--crop-views`` every added item is embedded whole and as five crops (its centre and
its four corners, each ``CROP_FRACTION`` of the width and height); with ``--grey-view``
also as a greyscale copy. An item scores its best view against a query, a view's score
weighed by ``VIEW_WEIGHT``. A query that shows part of a stored image (a crop, a zoom), or
a greyscale copy of it, then meets a view made like it. ``python -m bench retrieval``
measures it: 70% crops of the original are found first 0.99 of the time with crop views
against 0.80 with one vector per item (6x the model time per added item, 6x the index
memory), greyscale copies 1.00 with the grey view against 0.87.

The index holds one row per view, under the id ``fid * VIEW_SLOTS + view`` (view 0 is the
whole image); ``ViewedIndex`` keeps that out of sight of the store, which still adds,
removes, filters and finds items by their catalog row id (fid).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # images.py uses the crops: no FAISS import for it
    from batchserve.index import VectorIndex

#: Crops per item with ``--crop-views``: centre, top left, top right, bottom left, bottom right.
CROP_VIEWS = 5
#: Each crop's share of the image's width and height.
CROP_FRACTION = 0.7
#: A view's score is its cosine times this: a crop (or a grey copy) shows less of the item
#: than the whole image does. Top-1 of crop views on ``python -m bench retrieval``: 0.845 at
#: 1.0, 0.852 at 0.95; a first sweep found it flat from 0.94 to 0.97, and 0.836 at 0.9.
#: Stored as a scale of the view's vector, so FAISS ranks by it and an item's best view is
#: among the rows fetched. Index snapshots record it.
VIEW_WEIGHT = 0.95
#: Index ids reserved per item: enough for the whole image and every view.
VIEW_SLOTS = 8
#: The most results one GPU FAISS search returns (its GPU_MAX_SELECTION_K).
GPU_MAX_ROWS = 2048


def recipe(crops: bool, grey: bool) -> dict[str, Any]:
    """The views of an item as the model fingerprint (and so the catalog) records them:
    what is embedded, not how the index weighs it. Empty without views."""
    out: dict[str, Any] = {"crops": CROP_VIEWS, "side": CROP_FRACTION} if crops else {}
    if grey:
        out["grey"] = True
    return out


def count(views: dict[str, Any]) -> int:
    """How many views of an item ``recipe`` asks for: its crops, then the grey copy."""
    return int(views.get("crops", 0)) + (1 if views.get("grey") else 0)


def rows_to_fetch(k: int, views: int, device: str) -> int:
    """Index rows to fetch for the top ``k`` items: ``k * (1 + views)``, which holds every
    top item's best view in an exact search; on a GPU at most ``GPU_MAX_ROWS`` (past
    ``k``), so a search for hundreds of items may there miss a few in its tail."""
    rows = k * (1 + views)
    return min(rows, max(k, GPU_MAX_ROWS)) if device == "gpu" else rows


Box = tuple[int, int, int, int]


def crop_boxes(width: int, height: int, fraction: float = CROP_FRACTION) -> list[Box]:
    """The (left, top, right, bottom) pixel boxes of an item's crop views, in view order."""
    cw, ch = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - cw) // 2, (height - ch) // 2
    corners = [(0, 0), (width - cw, 0), (0, height - ch), (width - cw, height - ch)]
    return [(x, y, x + cw, y + ch) for x, y in [(left, top), *corners]]


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
