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

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.storage.catalog import (
    PRUNE_BATCH,
    PRUNED_SEQ,
    ChangeLogPruned,
    check_fingerprint,
    check_row,
    row_shape,
    stale,
)
from batchserve.storage.records import Item, NewItem

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
CREATE TABLE IF NOT EXISTS features (fid INTEGER PRIMARY KEY, orb BLOB NOT NULL);
"""


#: Row ids in one ``IN (...)`` list (SQLite allows 999 parameters at least).
_IN_BATCH = 500
#: SQLite's ``PRAGMA synchronous`` levels by number.
_SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}


class SqliteCatalog:
    """Items in SQLite at ``path`` (created readable by this user only). Each item's
    ``embedding`` column holds its embedding, then those of its ``views`` crop views."""

    #: Only this process writes it (see ``Catalog.shared``).
    shared = False

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
                if item.features is not None:
                    self._db.execute("INSERT INTO features VALUES (?, ?)", (fid, item.features))
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
        self._db.execute("DELETE FROM features WHERE fid = ?", (fid,))
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

    def local_features(self, fids: Sequence[int]) -> dict[int, bytes]:
        """The packed local features of each of ``fids`` that has them."""
        found: dict[int, bytes] = {}
        unique = list(dict.fromkeys(int(f) for f in fids))
        for start in range(0, len(unique), _IN_BATCH):
            chunk = unique[start : start + _IN_BATCH]
            rows = self._db.execute(
                f"SELECT fid, orb FROM features WHERE fid IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            found.update((int(row[0]), bytes(row[1])) for row in rows)
        return found

    def items_by_fid(self, fids: Sequence[int]) -> dict[int, Item]:
        if not fids:
            return {}
        found: dict[int, Item] = {}
        unique = list(dict.fromkeys(int(f) for f in fids))
        for start in range(0, len(unique), _IN_BATCH):
            chunk = unique[start : start + _IN_BATCH]
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

    def digests(
        self, item_ids: Sequence[str], with_features: bool = False
    ) -> dict[str, str | None]:
        """The source digest of each of ``item_ids`` present (None: indexed from no file;
        with ``with_features``, "" for one stored without local features: no file matches
        it, so a run that finds them indexes it again)."""
        present: dict[str, str | None] = {}
        for start in range(0, len(item_ids), 500):
            part = list(item_ids[start : start + 500])
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                "SELECT items.id, sources.sha256, features.fid IS NOT NULL FROM items "
                "LEFT JOIN sources ON sources.fid = items.fid "
                f"LEFT JOIN features ON features.fid = items.fid WHERE items.id IN ({marks})",
                part,
            )
            present.update((str(r[0]), stale(r[1], bool(r[2]), with_features)) for r in rows)
        return present

    # -- change log -----------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return max(int(row[0] or 0), self.pruned_seq())

    def pruned_seq(self) -> int:
        """The last change pruned (0: none); changes after it are all in the log."""
        return int(self.get_meta(PRUNED_SEQ) or 0)

    def changes_since(self, seq: int, limit: int | None = None) -> list[tuple[int, str, int]]:
        """(seq, op, fid) of the changes after ``seq``, oldest first, at most ``limit``;
        ``ChangeLogPruned`` when changes after ``seq`` were pruned."""
        if seq < (pruned := self.pruned_seq()):
            raise ChangeLogPruned(seq, pruned)
        return [
            (int(s), str(op), int(fid))
            for s, op, fid in self._db.execute(
                "SELECT seq, op, fid FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, -1 if limit is None else limit),
            )
        ]

    def record_replica(self, replica_id: str, applied_seq: int) -> None:
        """Nothing to record: this process alone reads the log (``prune_changes``' caller
        knows how far)."""

    def prune_changes(self, upto_seq: int) -> int:
        """Forget the changes up to ``upto_seq`` (already in every kept snapshot), a batch
        of PRUNE_BATCH per transaction; return how many."""
        pruned = 0
        while True:
            self._db.execute("BEGIN IMMEDIATE")  # not counted in ``commits``: no item changed
            try:
                rows = self._db.execute(
                    "DELETE FROM changes WHERE seq IN "
                    "(SELECT seq FROM changes WHERE seq <= ? ORDER BY seq LIMIT ?) RETURNING seq",
                    (upto_seq, PRUNE_BATCH),
                ).fetchall()
                if rows:
                    last = max(int(r[0]) for r in rows)
                    self.set_meta(PRUNED_SEQ, str(max(last, self.pruned_seq())))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            pruned += len(rows)
            if len(rows) < PRUNE_BATCH:
                return pruned


def _item(row: Sequence[Any]) -> Item:
    return Item(
        fid=int(row[0]),
        id=str(row[1]),
        label=row[2],
        predicted_class=row[3],
        metadata=json.loads(row[4]),
        created=float(row[5]),
    )
