"""The catalog: the durable source of truth of the items, behind one protocol that the
embedded SQLite catalog (``sqlite.py``) and the shared PostgreSQL catalog (``postgres.py``)
both satisfy, and the checks both make: the shape of an item's vectors, and the model that
made them.

A catalog holds one row per item under a row id (``fid``) that is never reused, and an
ordered change log of every add and delete, so that an index snapshot taken at change
``seq`` is brought up to date by replaying the changes after it. The log's oldest changes are
pruned (``prune_changes``); ``pruned_seq`` is the last change pruned, and the log is complete
only after it: ``changes_since`` an earlier change raises ``ChangeLogPruned`` rather than
return a log with a gap. It is used from one thread (the store thread); numpy in, numpy out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from batchserve.errors import ConfigError
from batchserve.storage.records import Item, NewItem

#: The meta key of the last change pruned from the log.
PRUNED_SEQ = "changes_pruned_seq"

#: Changes deleted per statement when pruning the log: short transactions, none that holds
#: the log for a whole backlog.
PRUNE_BATCH = 1000


class Catalog(Protocol):
    """What the item store needs of a catalog. ``dim`` is the embedding's length, ``views``
    the item views each row holds after its embedding; ``shared`` says whether other
    processes write it too (then a store follows its change log); ``commits`` counts the
    write transactions since it was opened."""

    dim: int
    views: int
    commits: int

    @property
    def shared(self) -> bool: ...

    def close(self) -> None: ...

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Record ``fingerprint`` in a new catalog; refuse one made by another model."""
        ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def upsert(self, items: Sequence[NewItem]) -> tuple[list[int], list[int]]:
        """Store ``items`` (replacing those of the same ids) durably: (their new fids in
        order, the fids they replaced)."""
        ...

    def delete(self, item_id: str) -> int | None:
        """Delete an item durably: its fid, or None if there was none."""
        ...

    def durability(self) -> dict[str, str]: ...

    def count(self) -> int: ...

    def get(self, item_id: str) -> Item | None: ...

    def page(self, limit: int, before_fid: int | None = None) -> list[Item]: ...

    def thumbnail(self, item_id: str) -> tuple[int, bytes | None] | None: ...

    def items_by_fid(self, fids: Sequence[int]) -> dict[int, Item]: ...

    def local_features(self, fids: Sequence[int]) -> dict[int, bytes]: ...

    def embedding(self, item_id: str) -> tuple[int, npt.NDArray[np.float32]] | None: ...

    def vectors(
        self, fids: Sequence[int] | None = None, chunk: int = 10_000
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]: ...

    def groups(self) -> Iterator[tuple[int, str | None, str | None]]: ...

    def ids(self, item_ids: Sequence[str]) -> set[str]: ...

    def digests(
        self, item_ids: Sequence[str], with_features: bool = False
    ) -> dict[str, str | None]: ...

    def last_seq(self) -> int:
        """The last change logged (pruned or not; 0 before any)."""
        ...

    def pruned_seq(self) -> int:
        """The last change pruned from the log (0: none): every change after it is kept."""
        ...

    def changes_since(self, seq: int, limit: int | None = None) -> list[tuple[int, str, int]]:
        """(seq, 'add' or 'del', fid) of the changes after ``seq``, oldest first, at most
        ``limit``; ``ChangeLogPruned`` when changes after ``seq`` were pruned."""
        ...

    def record_replica(self, replica_id: str, applied_seq: int) -> None:
        """Record that replica ``replica_id`` has applied the log up to ``applied_seq``, now:
        a shared catalog keeps the changes after it while that record is live."""
        ...

    def prune_changes(self, upto_seq: int) -> int:
        """Forget the changes up to ``upto_seq`` that the catalog's retention lets go, in
        small batches; return how many."""
        ...


class ChangeLogPruned(Exception):
    """Changes after ``seq`` were pruned from the log, up to ``pruned_seq``: replaying it
    from ``seq`` would miss them (the index is rebuilt from the items instead)."""

    def __init__(self, seq: int, pruned_seq: int) -> None:
        super().__init__(f"the change log is pruned up to change {pruned_seq}, past {seq}")
        self.seq = seq
        self.pruned_seq = pruned_seq


def row_shape(dim: int, views: int) -> tuple[int, ...]:
    """The shape of one item's vectors in a catalog with ``views`` views per item."""
    return (dim,) if views == 0 else (1 + views, dim)


def check_row(vector: npt.NDArray[np.float32], dim: int, views: int) -> None:
    """Refuse an item's vectors of another shape than ``row_shape(dim, views)``."""
    if vector.shape == row_shape(dim, views):
        return
    if views == 0:
        raise ValueError(f"embedding must have {dim} values")
    raise ValueError(
        f"an item's vectors must be its embedding and {views} views: [{1 + views}, {dim}]"
    )


class ModelMismatch(ConfigError):
    """The catalog's embeddings were made by another model."""

    code = "model_mismatch"


def check_fingerprint(where: str, stored: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuse embeddings made by another model than ``fingerprint``'s, or made another way
    (pooling, fit, border trimming, item views), saying which and what to do. A fingerprint stored
    before embeddings had options was made the way batchserve made them then."""
    from batchserve.models.spec import LEGACY_EMBEDDING, recipe_flags

    stored = {"embedding": LEGACY_EMBEDDING, **stored}
    fingerprint = {"embedding": LEGACY_EMBEDDING, **fingerprint}
    if stored == fingerprint:
        return
    model = ("name", "weights_sha256", "dim")
    if all(stored.get(k) == fingerprint.get(k) for k in model):
        raise ModelMismatch(
            f"{where} holds embeddings of this model made another way ({_recipe(stored)}) "
            f"than this server makes them ({_recipe(fingerprint)}): serve it as it was made "
            f"with {recipe_flags(stored['embedding'])}, or rebuild it from your images with "
            "`batchserve index SOURCE --data-dir NEW_DIR` (a new data dir or database)"
        )
    raise ModelMismatch(
        f"{where} holds embeddings of model {stored.get('name')} (dim {stored.get('dim')}, "
        f"weights {str(stored.get('weights_sha256'))[:12]}), not of {fingerprint.get('name')} "
        f"(dim {fingerprint.get('dim')}, weights "
        f"{str(fingerprint.get('weights_sha256'))[:12]}): serve it with that model, or "
        "use another data dir or database"
    )


def _recipe(fingerprint: dict[str, Any]) -> str:
    e = fingerprint.get("embedding") or {}
    trim = "borders trimmed" if e.get("trim_borders") else "borders kept"
    item_views = e.get("views") or {}
    crops = f", {item_views['crops']} crop views" if item_views.get("crops") else ""
    grey = ", a grey view" if item_views.get("grey") else ""
    return f"pooling {e.get('pooling')}, fit {e.get('fit')}, {trim}{crops}{grey}"


def stale(digest: str | None, has_features: bool, with_features: bool) -> str | None:
    """An item's source digest as ``Catalog.digests`` reports it: "" (no file's) for one
    indexed from a file without local features when they are wanted."""
    if with_features and digest is not None and not has_features:
        return ""
    return digest
