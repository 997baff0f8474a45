"""The catalog in PostgreSQL: one durable catalog shared by several replicas.

The ``Catalog`` protocol (catalog.py), with the meaning of the SQLite catalog (sqlite.py):
items under row ids (``fid``, the items' ids in the index, never reused) and an ordered
change log that each replica's index follows. Each replica is one process whose store
thread alone uses its ``PostgresCatalog``; several processes write the same database at
once, which is safe by these rules:

1. A write is acknowledged (``upsert``/``delete`` return) only after PostgreSQL committed it,
   with ``synchronous_commit`` at least ``on`` (a connection finding it ``off`` turns it on):
   the commit's WAL is flushed, and on synchronous standbys as the server is configured.
2. Ids are unique by constraint, and writes of one id are serialized: a transaction first takes
   a transaction-scoped advisory lock per id (a 64-bit hash of the id; a collision only
   serializes two ids needlessly), then deletes the id's old row (logging ``del``) and
   inserts the new one (logging ``add``). Two replicas upserting one id at once both succeed;
   the later commit wins everywhere, and the log never holds two live fids for one id.
3. The log's ``seq`` order is its commit order. A sequence hands out numbers when rows are
   inserted, not when they commit: without more, a transaction could take seq 10, another
   take 11 and commit first, and a follower that read ``seq > 9`` and saw 11 would then ask
   for ``seq > 11`` and never see 10. So each write transaction takes one global advisory
   lock (``LOG_LOCK``) just before it appends to ``changes`` and holds it to its commit:
   seqs are handed out only under the lock, and a transaction's changes are visible before
   the next one can take any. Seqs may have gaps (rolled-back transactions); followers must
   not expect them to be consecutive. The cost: the tail of write transactions (log rows,
   NOTIFY, commit) runs one at a time across all replicas, which is one commit per batch of
   items.
4. Locks are taken in one order: per-id locks in ascending key order, then the log lock;
   no transaction waits for a per-id lock while holding the log lock, so there are no
   deadlocks. Per-id keys are single 64-bit advisory keys; the schema and log locks use the
   two-int form, a separate key space, so an id's hash can never equal them.
5. Each write transaction ends with ``NOTIFY batchserve_changes, '<its last seq>'``, delivered
   at commit; ``ChangeListener`` wakes followers with it (polling stays the fallback: a
   notification can be lost while a listener reconnects).
6. Unreachable PostgreSQL, a pool with no connection in time, or a statement past
   ``statement_timeout_s`` raise ``CatalogUnavailable`` (HTTP 503, retry after 1 s) within
   about ``connect_timeout_s``; the pool reconnects by itself when the server is back. A
   write that fails so may still have committed (the connection was lost during COMMIT): an
   upsert is safe to retry (the id is replaced), and the log still tells every replica.
   A connection idle inside a transaction past ``statement_timeout_s`` is ended by the
   server, so a replica that vanishes mid-write cannot hold the log lock for long.
7. A server that accepts connections and never answers (its processes stopped, or stuck on
   a stalled disk) fires none of its own timeouts, and the kernel still answers TCP keepalives:
   so every wait for an answer is also bounded on the client side (``Watchdog``). Past
   ``connect_timeout_s + statement_timeout_s`` the connection's socket is shut down, the
   call raises ``CatalogUnavailable`` and the pool drops the connection. While the
   database is unavailable, a call finding no pooled connection ready is refused after
   ``_FAILING_WAIT_S`` (the pool reconnects meanwhile), so that the store thread, where
   searches wait their turn, is not held up call after call.
8. The log is pruned, never past a live replica: each records in ``replicas`` how far it has
   applied the log (its id, ``applied_seq``, when seen, on the database's clock); a pruning
   pass deletes, PRUNE_BATCH rows a statement, the oldest changes that every replica seen
   within ``replica_expiry_s`` has applied and that are older than ``change_log_retention_s``,
   and raises ``pruned_seq`` (in ``meta``) in the same transaction. A reader reads the log,
   then ``pruned_seq``: a pass that deleted what it was to read committed before the second
   read, so a gap is always seen (``ChangeLogPruned``).

Writes are few statements sent as pipelines (one round trip each); reads of the whole table
(``vectors()``, ``groups()``) use a server-side cursor and hold one pooled connection while
their iterator is consumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed

from batchserve.errors import NotReady
from batchserve.storage.catalog import (
    PRUNE_BATCH,
    PRUNED_SEQ,
    ChangeLogPruned,
    check_fingerprint,
    check_row,
    row_shape,
    stale,
)
from batchserve.storage.outage import few_words
from batchserve.storage.postgres_schema import (
    CHANNEL,
    INSERT_ITEM,
    ITEM_COLUMNS,
    KEEPALIVES,
    LOG_LOCK,
    PRUNE,
    PRUNE_LOCK,
    SCHEMA,
    SCHEMA_LOCK,
    libpq_timeout_s,
)
from batchserve.storage.records import Item, NewItem
from batchserve.storage.watchdog import NoAnswer, Watchdog

log = logging.getLogger(__name__)

#: How long the pool keeps reconnecting in the background after a failure (with backoff
#: from 1 s, doubling) before it waits for the next caller to ask: longer, and a server back
#: after a long outage may wait out a long backoff step before the pool sees it.
_RECONNECT_S = 5.0

#: While the database is unavailable, how long a call waits for a pooled connection (the
#: pool reconnects in the background meanwhile, and a waiting call prompts it to): a call
#: that cannot be answered is refused at once, instead of holding up the store thread, where
#: searches wait behind it.
_FAILING_WAIT_S = 0.25

#: Rows per query when reading rows by fid or id.
_BATCH = 1000

#: Vector bytes per fetch when reading vectors: 10,000 rows of an item with six views are
#: 300 MB, which would not arrive within a statement's bound on a slow link.
_FETCH_BYTES = 16 * 1024 * 1024


class CatalogUnavailable(NotReady):
    """The catalog's PostgreSQL cannot be reached or did not answer in time (HTTP 503).

    Its message is what a client reads, so it names no address; ``detail`` (the database's
    address and the driver's error) is for the log only."""

    code = "catalog_unavailable"

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__("the shared catalog is unavailable", retry_after_s)
        self.detail = detail

    @property
    def reason(self) -> str:
        return few_words(self.detail) or str(self)


def _where(url: str) -> str:
    """``url`` without user or password, for messages."""
    params = conninfo_to_dict(url)
    host, port, name = params.get("host", ""), params.get("port", 5432), params.get("dbname", "")
    return f"postgresql://{host}:{port}/{name}"


def id_lock_key(item_id: str) -> int:
    """The advisory lock key of an id: the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresCatalog:
    """Items in the PostgreSQL database at ``url``, shared with other replicas.

    ``connect_timeout_s`` bounds a connection attempt (libpq rounds it up to whole seconds,
    at least 2) and a wait for a pooled connection; ``statement_timeout_s`` bounds each
    statement on the server, lock waits included. On the client side, every wait for an
    answer (a pooled connection's check, a statement or pipeline, a commit, a chunk of rows)
    is cut after ``bound_s``, their sum, so that the server's own timeout, when it can fire,
    comes first. A change stays in the log ``change_log_retention_s`` at least, and while a
    replica seen within ``replica_expiry_s`` has not applied it (rule 8). Creates the schema
    if missing; raises ``CatalogUnavailable`` if the server cannot be reached.
    """

    #: Other processes write it too: a store follows its change log (store.ItemStore).
    shared = True

    def __init__(
        self,
        url: str,
        dim: int,
        views: int = 0,
        pool_min: int = 1,
        pool_max: int = 4,
        connect_timeout_s: float = 2.0,
        statement_timeout_s: float = 5.0,
        change_log_retention_s: float = 3600.0,
        replica_expiry_s: float = 86400.0,
    ) -> None:
        self.dim = dim
        self.change_log_retention_s = change_log_retention_s
        self.replica_expiry_s = replica_expiry_s
        #: Crop views per item: each item's ``embedding`` holds its embedding, then theirs.
        self.views = views
        self.where = _where(url)
        timeout_ms = max(1, round(statement_timeout_s * 1000))
        options = (
            f"-c statement_timeout={timeout_ms} -c idle_in_transaction_session_timeout={timeout_ms}"
        )
        if given := conninfo_to_dict(url).get("options"):
            options = f"{given} {options}"
        self._connect_timeout_s = libpq_timeout_s(connect_timeout_s)
        #: The longest wait for an answer on the client side, in seconds.
        self.bound_s = self._connect_timeout_s + statement_timeout_s
        self._watchdog = Watchdog(self.bound_s)
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": self._connect_timeout_s,
            "options": options,
            "application_name": "batchserve",
            **KEEPALIVES,
        }
        #: Write transactions committed since opening (one per upsert or delete).
        self.commits = 0
        #: Whether the last call found the database unavailable (its log line said why).
        self._failing = False
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url,
            min_size=pool_min,
            max_size=pool_max,
            kwargs=self._kwargs,
            configure=self._configure,
            # One more round trip per call, so that a connection broken while idle (a
            # server restart) is replaced instead of failing the call.
            check=self._check,
            timeout=connect_timeout_s,
            reconnect_timeout=_RECONNECT_S,
            name="batchserve-catalog",
            open=False,
        )
        try:
            with self._unavailable():
                # A direct connection first: its error says why (refused, no such database).
                with (
                    psycopg.connect(url, **self._kwargs) as conn,
                    self._watchdog.watching(conn),
                    conn.transaction(),
                ):
                    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", SCHEMA_LOCK)
                    conn.execute(SCHEMA)
                self._pool.open(wait=True, timeout=2.0 * self._connect_timeout_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._pool.close()
        self._watchdog.close()

    def _configure(self, conn: psycopg.Connection[TupleRow]) -> None:
        """A new pooled connection: commits wait for the WAL flush (rule 1)."""
        with self._watchdog.watching(conn):
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is not None and row[0] == "off":
                conn.execute("SET synchronous_commit = on")

    def _check(self, conn: psycopg.Connection[TupleRow]) -> None:
        """A pooled connection still answers (else the pool replaces it)."""
        with self._watchdog.watching(conn):
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Driver errors of reaching the database as CatalogUnavailable; where and why go
        to the log (a warning at the first failure after a success, as the follower logs an
        outage once), never into the message a client reads."""
        cuts = self._watchdog.cuts
        try:
            yield
        except PoolClosed:
            raise
        except psycopg.OperationalError as e:
            why = str(e)
            if self._watchdog.cuts != cuts and not isinstance(e, NoAnswer):
                # The pool's check of a connection was cut: the pool says only that it had
                # none to give.
                why = f"no answer from the server within {self.bound_s:g} s; {why}"
            detail = f"the catalog database {self.where} is unavailable: {why}"
            log.log(logging.DEBUG if self._failing else logging.WARNING, "%s", detail)
            self._failing = True
            raise CatalogUnavailable(detail) from e
        self._failing = False

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A pooled connection, watched: a call's waits on it are bounded from its start
        (calls of several waits renew the bound at each)."""
        wait_s = _FAILING_WAIT_S if self._failing else None  # None: connect_timeout_s
        with (
            self._unavailable(),
            self._pool.connection(timeout=wait_s) as conn,
            self._watchdog.watching(conn),
        ):
            yield conn

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[TupleRow]]:
        with self._connection() as conn:
            with conn.transaction():
                yield conn
                self._watchdog.renew(conn)  # the commit
            self.commits += 1

    def _one(self, query: str, params: Sequence[Any] = ()) -> TupleRow | None:
        with self._connection() as conn:
            return conn.execute(query, params).fetchone()

    # -- model fingerprint ----------------------------------------------------------------

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Record which model makes the embeddings, or refuse another one."""
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meta VALUES ('model', %s) ON CONFLICT (key) DO NOTHING",
                (json.dumps(fingerprint, sort_keys=True),),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        stored = json.loads(row[0]) if row is not None else fingerprint
        check_fingerprint(f"the catalog database {self.where}", stored, fingerprint)

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = %s", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meta VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, items: Sequence[NewItem]) -> tuple[list[int], list[int]]:
        """Add ``items`` in one transaction, replacing items with the same id (also an
        earlier one of the same batch). Returns (new fids in order, fids of the replaced
        rows). Committed on return."""
        vectors = [np.ascontiguousarray(item.vectors, dtype=np.float32) for item in items]
        for vector in vectors:
            check_row(vector, self.dim, self.views)
        added: list[int] = []
        replaced: list[int] = []
        log: list[tuple[str, int]] = []
        now = time.time()
        with self._write() as conn:
            if not items:
                return added, replaced
            with conn.pipeline():
                self._lock_ids(conn, [item.id for item in items])
                queued = [
                    (
                        conn.execute("DELETE FROM items WHERE id = %s RETURNING fid", (item.id,)),
                        conn.execute(
                            INSERT_ITEM,
                            {
                                "id": item.id,
                                "label": item.label,
                                "class": item.predicted_class,
                                "metadata": Jsonb(item.metadata),
                                "embedding": vector.tobytes(),
                                "created": now,
                                "jpeg": item.thumbnail or None,
                                "digest": item.digest,
                                "features": item.features,
                            },
                        ),
                    )
                    for item, vector in zip(items, vectors, strict=True)
                ]
            for deleted, inserted in queued:
                if (old := deleted.fetchone()) is not None:
                    replaced.append(int(old[0]))
                    log.append(("del", int(old[0])))
                new = inserted.fetchone()
                assert new is not None
                added.append(int(new[0]))
                log.append(("add", int(new[0])))
            self._append(conn, log)
        return added, replaced

    def delete(self, item_id: str) -> int | None:
        """Delete the item; return its fid, or None if there was no such item."""
        with self._write() as conn:
            self._lock_ids(conn, [item_id])
            row = conn.execute(
                "DELETE FROM items WHERE id = %s RETURNING fid", (item_id,)
            ).fetchone()
            if row is None:
                return None
            self._append(conn, [("del", int(row[0]))])
        return int(row[0])

    def _lock_ids(self, conn: psycopg.Connection[TupleRow], item_ids: Sequence[str]) -> None:
        # Ascending keys: two transactions locking overlapping ids cannot deadlock. unnest
        # yields the array in order, and the locks are taken row by row.
        keys = sorted({id_lock_key(i) for i in item_ids})
        self._watchdog.renew(conn)
        conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))

    def _append(self, conn: psycopg.Connection[TupleRow], log: Sequence[tuple[str, int]]) -> None:
        """Log ``log`` (op, fid) in order and notify followers, under the log lock (held to
        commit, so that seq order is commit order: see the module's docstring)."""
        self._watchdog.renew(conn)
        with conn.pipeline():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", LOG_LOCK)
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO changes (op, fid) VALUES (%s, %s)", log)
            conn.execute(
                "SELECT pg_notify(%s, currval(pg_get_serial_sequence('changes', 'seq'))::text)",
                (CHANNEL,),
            )

    def durability(self) -> dict[str, str]:
        """What a commit waits for, as the server reports it for a pooled connection
        (``synchronous_commit`` ``on`` and ``fsync`` ``on``: flushed when it returns)."""
        row = self._one(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'), "
            "current_setting('fsync'), current_setting('synchronous_standby_names')"
        )
        assert row is not None
        return {
            "engine": "postgresql",
            "server_version": str(row[0]),
            "synchronous_commit": str(row[1]),
            "fsync": str(row[2]),
            "synchronous_standby_names": str(row[3]),
        }

    # -- reads ----------------------------------------------------------------------------

    def count(self) -> int:
        row = self._one("SELECT count(*) FROM items")
        return 0 if row is None else int(row[0])

    def get(self, item_id: str) -> Item | None:
        row = self._one(f"{ITEM_COLUMNS} WHERE id = %s", (item_id,))
        return None if row is None else _item(row)

    def page(self, limit: int, before_fid: int | None = None) -> list[Item]:
        """Up to ``limit`` items, newest first, older than row ``before_fid`` if given."""
        with self._connection() as conn:
            if before_fid is None:
                rows = conn.execute(f"{ITEM_COLUMNS} ORDER BY fid DESC LIMIT %s", (limit,))
            else:
                rows = conn.execute(
                    f"{ITEM_COLUMNS} WHERE fid < %s ORDER BY fid DESC LIMIT %s",
                    (before_fid, limit),
                )
            return [_item(row) for row in rows]

    def thumbnail(self, item_id: str) -> tuple[int, bytes | None] | None:
        """(fid, JPEG or None when the item has no thumbnail), or None for no such item."""
        row = self._one(
            "SELECT items.fid, thumbnails.jpeg FROM items "
            "LEFT JOIN thumbnails ON thumbnails.fid = items.fid WHERE items.id = %s",
            (item_id,),
        )
        return None if row is None else (int(row[0]), None if row[1] is None else bytes(row[1]))

    def local_features(self, fids: Sequence[int]) -> dict[int, bytes]:
        """The packed local features of each of ``fids`` that has them."""
        found: dict[int, bytes] = {}
        unique = list(dict.fromkeys(int(f) for f in fids))
        with self._connection() as conn:
            for start in range(0, len(unique), _BATCH):
                self._watchdog.renew(conn)
                rows = conn.execute(
                    "SELECT fid, orb FROM features WHERE fid = ANY(%s::bigint[])",
                    (unique[start : start + _BATCH],),
                )
                found.update((int(row[0]), bytes(row[1])) for row in rows)
        return found

    def items_by_fid(self, fids: Sequence[int]) -> dict[int, Item]:
        unique = list(dict.fromkeys(int(f) for f in fids))
        found: dict[int, Item] = {}
        with self._connection() as conn:
            for start in range(0, len(unique), _BATCH):
                self._watchdog.renew(conn)
                rows = conn.execute(
                    f"{ITEM_COLUMNS} WHERE fid = ANY(%s::bigint[])",
                    (unique[start : start + _BATCH],),
                )
                found.update((int(row[0]), _item(row)) for row in rows)
        return found

    def embedding(self, item_id: str) -> tuple[int, npt.NDArray[np.float32]] | None:
        row = self._one("SELECT fid, embedding FROM items WHERE id = %s", (item_id,))
        if row is None:
            return None
        return int(row[0]), np.frombuffer(row[1], dtype=np.float32)[: self.dim].copy()

    def vectors(
        self, fids: Sequence[int] | None = None, chunk: int = 10_000
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """(fids int64 [n], vectors float32 [n, dim], or with crop views [n, 1 + views, dim])
        of the given rows, or of every row, in chunks of at most ``chunk`` rows (and of about
        ``_FETCH_BYTES`` of vectors, so that each fetch ends well within the statement's
        bound), ascending fid."""
        row_bytes = 4 * self.dim * (1 + self.views)
        chunk = max(1, min(chunk, _FETCH_BYTES // row_bytes))
        if fids is None:
            for rows in self._stream("SELECT fid, embedding FROM items ORDER BY fid", chunk):
                yield self._stack(rows)
            return
        unique = sorted({int(f) for f in fids})
        step = min(chunk, _BATCH)
        with self._connection() as conn:
            for start in range(0, len(unique), step):
                self._watchdog.renew(conn)
                with conn.cursor(binary=True) as cursor:
                    rows = cursor.execute(
                        "SELECT fid, embedding FROM items "
                        "WHERE fid = ANY(%s::bigint[]) ORDER BY fid",
                        (unique[start : start + step],),
                    ).fetchall()
                if rows:
                    with self._watchdog.paused(conn):
                        yield self._stack(rows)

    def _stream(self, query: str, chunk: int) -> Iterator[list[TupleRow]]:
        """The rows of ``query`` in lists of ``chunk``, from a server-side cursor (one
        snapshot; the connection is held until the iterator ends or is closed)."""
        with self._connection() as conn, conn.transaction():
            # The caller may take its time between chunks, and this transaction takes no
            # lock that a writer waits for.
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            with conn.cursor("batchserve_stream", binary=True) as cursor:
                cursor.itersize = chunk
                cursor.execute(query)
                while rows := cursor.fetchmany(chunk):
                    with self._watchdog.paused(conn):  # the caller's time, not the server's
                        yield rows

    def _stack(self, rows: list[TupleRow]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
        return ids, vectors.reshape(len(rows), *row_shape(self.dim, self.views))

    def groups(self) -> Iterator[tuple[int, str | None, str | None]]:
        """(fid, label, predicted class) of every item, for the filter maps."""
        for rows in self._stream("SELECT fid, label, class FROM items", 10_000):
            for fid, label, klass in rows:
                yield int(fid), label, klass

    def ids(self, item_ids: Sequence[str]) -> set[str]:
        """Which of ``item_ids`` are present."""
        return set(self.digests(item_ids))

    def digests(
        self, item_ids: Sequence[str], with_features: bool = False
    ) -> dict[str, str | None]:
        """As ``SqliteCatalog.digests``."""
        present: dict[str, str | None] = {}
        with self._connection() as conn:
            for start in range(0, len(item_ids), _BATCH):
                self._watchdog.renew(conn)
                rows = conn.execute(
                    "SELECT items.id, sources.sha256, features.fid IS NOT NULL FROM items "
                    "LEFT JOIN sources ON sources.fid = items.fid "
                    "LEFT JOIN features ON features.fid = items.fid "
                    "WHERE items.id = ANY(%s::text[])",
                    (list(item_ids[start : start + _BATCH]),),
                )
                present.update(
                    (str(row[0]), stale(row[1], bool(row[2]), with_features)) for row in rows
                )
        return present

    # -- change log -----------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self._one(
            "SELECT greatest((SELECT max(seq) FROM changes), "
            "(SELECT value::bigint FROM meta WHERE key = %s))",
            (PRUNED_SEQ,),
        )
        return 0 if row is None or row[0] is None else int(row[0])

    def pruned_seq(self) -> int:
        """The last change pruned (0: none); changes after it are all in the log."""
        return int(self.get_meta(PRUNED_SEQ) or 0)

    def changes_since(self, seq: int, limit: int | None = None) -> list[tuple[int, str, int]]:
        """(seq, 'add' or 'del', fid) after ``seq``, in commit order, at most ``limit``;
        ``ChangeLogPruned`` when changes after ``seq`` were pruned."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT seq, op, fid FROM changes WHERE seq > %s ORDER BY seq LIMIT %s::bigint",
                (seq, limit),
            ).fetchall()
            # After the log, in a later snapshot: sees any pass that pruned what it read.
            pruned = conn.execute("SELECT value FROM meta WHERE key = %s", (PRUNED_SEQ,))
            horizon = int(row[0]) if (row := pruned.fetchone()) is not None else 0
        if seq < horizon:
            raise ChangeLogPruned(seq, horizon)
        return [(int(s), str(op), int(fid)) for s, op, fid in rows]

    def record_replica(self, replica_id: str, applied_seq: int) -> None:
        """Record how far replica ``replica_id`` has applied the log, seen now."""
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO replicas VALUES (%s, %s, now()) ON CONFLICT (id) DO UPDATE "
                "SET applied_seq = excluded.applied_seq, seen = excluded.seen",
                (replica_id, applied_seq),
            )

    def prune_changes(self, upto_seq: int, batches: int = 10) -> int:
        """Delete the changes up to ``upto_seq`` that every live replica has applied and that
        are older than the retention (rule 8): at most ``batches`` statements, each its own
        transaction, none while another replica prunes. Returns the changes deleted."""
        pruned = 0
        params = {
            "upto": upto_seq,
            "keep_s": self.change_log_retention_s,
            "expiry_s": self.replica_expiry_s,
        }
        with self._connection() as conn:
            for _ in range(batches):
                self._watchdog.renew(conn)
                with conn.transaction():
                    got = conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", PRUNE_LOCK)
                    if not (row := got.fetchone()) or not row[0]:
                        break
                    deleted = int((conn.execute(PRUNE, params).fetchone() or (0,))[0])
                pruned += deleted
                if deleted < PRUNE_BATCH:
                    break
        return pruned


def _item(row: Sequence[Any]) -> Item:
    return Item(
        fid=int(row[0]),
        id=str(row[1]),
        label=row[2],
        predicted_class=row[3],
        metadata=row[4],
        created=float(row[5]),
    )
