"""The catalog: durable item records in SQLite, the source of truth of the index.

One row per item: its id, label, metadata (JSON), predicted class, embedding (with crop
views, followed by theirs) and time added, under a row id (``fid``) that is the item's id in
the index (``views.ViewedIndex`` gives each view a row id of its own) and is never reused. Every
add and delete is also written to a change log, so an index snapshot taken at change
``seq`` is brought up to date by replaying the changes after it. WAL mode with
``synchronous=FULL``: a commit is on disk when ``upsert``/``delete`` return, which is when
the server acknowledges.

Used from one thread (the index thread); numpy in, numpy out.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.errors import ConfigError
from batchserve.records import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    label TEXT,
    class TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    embedding BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'del')),
    fid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS thumbnails (fid INTEGER PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sources (fid INTEGER PRIMARY KEY, sha256 TEXT NOT NULL);
"""


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

    @functools.cached_property
    def vectors(self) -> npt.NDArray[np.float32]:
        """What the index holds of it: the embedding [dim], or with item views the
        embedding then the views [1 + views, dim] (made once: the catalog and the index
        both read it)."""
        if self.views is None:
            return self.embedding
        return np.vstack([self.embedding[None, :], self.views]).astype(np.float32, copy=False)


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
    from batchserve.models import LEGACY_EMBEDDING, recipe_flags

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


#: SQLite's ``PRAGMA synchronous`` levels by number.
_SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}


class Catalog:
    """Items in SQLite at ``path`` (created readable by this user only). Each item's
    ``embedding`` column holds its embedding, then those of its ``views`` crop views."""

    def __init__(self, path: Path, dim: int, views: int = 0) -> None:
        self.path = path
        self.dim = dim
        self.views = views
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if new:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        #: Write transactions committed since opening (one per batch of adds).
        self.commits = 0

    def close(self) -> None:
        self._db.close()

    # -- model fingerprint ----------------------------------------------------------------

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Record which model makes the embeddings, or refuse another one."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta VALUES ('model', ?)", (json.dumps(fingerprint, sort_keys=True),)
            )
            return
        check_fingerprint(f"the data dir {self.path.parent}", json.loads(row[0]), fingerprint)

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, items: Sequence[NewItem]) -> tuple[list[int], list[int]]:
        """Add ``items`` in one transaction, replacing items with the same id.

        Returns (new fids in order, fids of the replaced rows). Durable on return.
        """
        added: list[int] = []
        replaced: list[int] = []
        now = time.time()
        with self._transaction():
            for item in items:
                vector = np.ascontiguousarray(item.vectors, dtype=np.float32)
                check_row(vector, self.dim, self.views)
                old = self._db.execute("SELECT fid FROM items WHERE id = ?", (item.id,)).fetchone()
                if old is not None:
                    self._remove(int(old[0]))
                    replaced.append(int(old[0]))
                cursor = self._db.execute(
                    "INSERT INTO items (id, label, class, metadata, embedding, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        item.id,
                        item.label,
                        item.predicted_class,
                        json.dumps(item.metadata, separators=(",", ":")),
                        vector.tobytes(),
                        now,
                    ),
                )
                fid = int(cursor.lastrowid or 0)
                self._db.execute("INSERT INTO changes (op, fid) VALUES ('add', ?)", (fid,))
                if item.thumbnail:
                    self._db.execute("INSERT INTO thumbnails VALUES (?, ?)", (fid, item.thumbnail))
                if item.digest:
                    self._db.execute("INSERT INTO sources VALUES (?, ?)", (fid, item.digest))
                added.append(fid)
        return added, replaced

    def delete(self, item_id: str) -> int | None:
        """Delete the item; return its fid, or None if there was no such item."""
        with self._transaction():
            row = self._db.execute("SELECT fid FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            self._remove(int(row[0]))
        return int(row[0])

    def _remove(self, fid: int) -> None:
        self._db.execute("DELETE FROM items WHERE fid = ?", (fid,))
        self._db.execute("DELETE FROM thumbnails WHERE fid = ?", (fid,))
        self._db.execute("DELETE FROM sources WHERE fid = ?", (fid,))
        self._db.execute("INSERT INTO changes (op, fid) VALUES ('del', ?)", (fid,))

    def durability(self) -> dict[str, str]:
        """The journal mode and synchronous level of the live connection, as SQLite reports
        them (``wal`` and ``full``: a commit is on disk when it returns)."""
        journal = str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        level = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return {"journal_mode": journal, "synchronous": _SYNCHRONOUS[level]}

    def _transaction(self) -> Any:
        catalog, db = self, self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind: object, value: object, tb: object) -> None:
                if kind is None:
                    db.execute("COMMIT")
                    catalog.commits += 1
                else:
                    db.execute("ROLLBACK")

        return _Tx()

    # -- reads ----------------------------------------------------------------------------

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def get(self, item_id: str) -> Item | None:
        row = self._db.execute(
            "SELECT fid, id, label, class, metadata, created FROM items WHERE id = ?", (item_id,)
        ).fetchone()
        return None if row is None else _item(row)

    def page(self, limit: int, before_fid: int | None = None) -> list[Item]:
        """Up to ``limit`` items, newest first, older than row ``before_fid`` if given."""
        rows = self._db.execute(
            "SELECT fid, id, label, class, metadata, created FROM items "
            "WHERE (? IS NULL OR fid < ?) ORDER BY fid DESC LIMIT ?",
            (before_fid, before_fid, limit),
        )
        return [_item(row) for row in rows]

    def thumbnail(self, item_id: str) -> tuple[int, bytes | None] | None:
        """(fid, JPEG or None when the item has no thumbnail), or None for no such item."""
        row = self._db.execute(
            "SELECT items.fid, thumbnails.jpeg FROM items "
            "LEFT JOIN thumbnails ON thumbnails.fid = items.fid WHERE items.id = ?",
            (item_id,),
        ).fetchone()
        return None if row is None else (int(row[0]), None if row[1] is None else bytes(row[1]))

    def items_by_fid(self, fids: Sequence[int]) -> dict[int, Item]:
        if not fids:
            return {}
        found: dict[int, Item] = {}
        unique = list(dict.fromkeys(int(f) for f in fids))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                "SELECT fid, id, label, class, metadata, created FROM items "
                f"WHERE fid IN ({marks})",
                chunk,
            ):
                found[int(row[0])] = _item(row)
        return found

    def embedding(self, item_id: str) -> tuple[int, npt.NDArray[np.float32]] | None:
        row = self._db.execute(
            "SELECT fid, embedding FROM items WHERE id = ?", (item_id,)
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), np.frombuffer(row[1], dtype=np.float32)[: self.dim].copy()

    def vectors(
        self, fids: Sequence[int] | None = None, chunk: int = 10_000
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """(fids [n], vectors [n, dim] or with crop views [n, 1 + views, dim]) of the given
        rows, or of every row, in chunks."""
        if fids is None:
            cursor = self._db.execute("SELECT fid, embedding FROM items ORDER BY fid")
            while rows := cursor.fetchmany(chunk):
                yield self._stack(rows)
            return
        unique = list(dict.fromkeys(int(f) for f in fids))
        for start in range(0, len(unique), 500):
            part = unique[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT fid, embedding FROM items WHERE fid IN ({marks}) ORDER BY fid", part
            ).fetchall()
            if rows:
                yield self._stack(rows)

    def _stack(self, rows: list[Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return ids, vectors.reshape(len(rows), *row_shape(self.dim, self.views))

    def groups(self) -> Iterator[tuple[int, str | None, str | None]]:
        """(fid, label, predicted class) of every item, for the filter maps."""
        for fid, label, klass in self._db.execute("SELECT fid, label, class FROM items"):
            yield int(fid), label, klass

    def ids(self, item_ids: Sequence[str]) -> set[str]:
        """Which of ``item_ids`` are present."""
        return set(self.digests(item_ids))

    def digests(self, item_ids: Sequence[str]) -> dict[str, str | None]:
        """The source digest of each of ``item_ids`` present (None: indexed from no file)."""
        present: dict[str, str | None] = {}
        for start in range(0, len(item_ids), 500):
            part = list(item_ids[start : start + 500])
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                "SELECT items.id, sources.sha256 FROM items LEFT JOIN sources "
                f"ON sources.fid = items.fid WHERE items.id IN ({marks})",
                part,
            )
            present.update((str(r[0]), r[1]) for r in rows)
        return present

    # -- change log -----------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def changes_since(self, seq: int, limit: int | None = None) -> list[tuple[int, str, int]]:
        """(seq, op, fid) of the changes after ``seq``, oldest first, at most ``limit``."""
        return [
            (int(s), str(op), int(fid))
            for s, op, fid in self._db.execute(
                "SELECT seq, op, fid FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, -1 if limit is None else limit),
            )
        ]

    def prune_changes(self, upto_seq: int) -> None:
        """Forget changes already in every kept snapshot."""
        self._db.execute("DELETE FROM changes WHERE seq <= ?", (upto_seq,))


def _item(row: Sequence[Any]) -> Item:
    return Item(
        fid=int(row[0]),
        id=str(row[1]),
        label=row[2],
        predicted_class=row[3],
        metadata=json.loads(row[4]),
        created=float(row[5]),
    )
