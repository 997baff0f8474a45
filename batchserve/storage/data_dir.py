"""Opening the item store of a data dir for a model: its FAISS index (several rows per item
with item views), on the data dir's own SQLite catalog or on the shared one the settings
name. The server and ``batchserve index`` open it the same way."""

from __future__ import annotations

from pathlib import Path

from batchserve.models.spec import ModelInfo
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.store import ItemStore, SearchableIndex, StoreSettings
from batchserve.storage.viewed_index import ViewedIndex


def open_store(settings: StoreSettings, params: IndexParams, info: ModelInfo) -> ItemStore:
    """The item store for ``info``'s embeddings in the data dir, on its own catalog or a
    shared one (either refuses another model's)."""
    rows = VectorIndex(info.dim, params)
    # With crop views, an index of rows, several per item, used by item.
    index: SearchableIndex = ViewedIndex(rows, info.views) if info.views else rows
    catalog = settings.open_catalog(info.dim, info.views)
    return ItemStore(
        Path(settings.data_dir), index, info.fingerprint(), catalog=catalog, views=info.views
    )
