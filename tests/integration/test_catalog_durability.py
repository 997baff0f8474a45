"""The PostgreSQL catalog's durability promise (rule 1 of batchserve/storage/postgres.py),
observed where it is decided: on the pooled connection that writes, inside each write
transaction as it commits, the commit waits for the WAL flush (``synchronous_commit`` on,
whatever the database's default); and once a write is acknowledged, the server's WAL is
flushed past everything that transaction wrote. A real PostgreSQL from tests/postgres.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import Transaction, sql
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from batchserve.storage import postgres as catalog_module
from batchserve.storage.postgres import PostgresCatalog
from batchserve.storage.records import NewItem
from tests.postgres import PostgresCluster

DIM = 8
#: Read on the writing connection just before its COMMIT: what the commit will wait for,
#: and where the WAL ends (the transaction's rows are before it, its commit record after).
AT_COMMIT = "SELECT current_setting('synchronous_commit'), pg_current_wal_insert_lsn()::text"


@dataclass(frozen=True)
class Commit:
    synchronous_commit: str
    wal_end: str


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[Commit]:
    """Each transaction committed on the catalog's pooled connections, as seen from inside
    it just before its COMMIT (the pool is given connections that look)."""
    seen: list[Commit] = []

    class Observed(psycopg.Connection[TupleRow]):
        @contextmanager
        def transaction(
            self, savepoint_name: str | None = None, force_rollback: bool = False
        ) -> Iterator[Transaction]:
            with super().transaction(savepoint_name, force_rollback) as tx:
                yield tx
                row = self.execute(AT_COMMIT).fetchone()
                assert row is not None
                seen.append(Commit(str(row[0]), str(row[1])))

    class ObservedPool(ConnectionPool[psycopg.Connection[TupleRow]]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "connection_class": Observed})

    monkeypatch.setattr(catalog_module, "ConnectionPool", ObservedPool)
    return seen


def item(i: int) -> NewItem:
    v = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
    return NewItem(f"id{i}", v / np.linalg.norm(v), "a", {"i": i})


@pytest.mark.parametrize("database_default", ["on", "off"])
def test_each_write_commits_with_synchronous_commit_on_and_is_flushed_when_acknowledged(
    postgres: PostgresCluster, commits: list[Commit], database_default: str
) -> None:
    url = postgres.create_database()
    with psycopg.connect(postgres.url(), autocommit=True) as observer:
        name = sql.Identifier(url.rsplit("/", 1)[1])
        observer.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
                name, sql.SQL(database_default)
            )
        )
        catalog = PostgresCatalog(url, DIM)
        try:
            writes: list[Callable[[], object]] = [
                lambda: catalog.upsert([item(0), item(1)]),
                lambda: catalog.upsert([item(0)]),  # replaces id0: a del and an add
                lambda: catalog.delete("id1"),
            ]
            for write in writes:
                before = len(commits)
                write()
                made = commits[before:]
                assert made, "the write committed no transaction on a pooled connection"
                assert {c.synchronous_commit for c in made} <= {"on", "remote_apply"}, made
                flushed = observer.execute(
                    "SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (made[-1].wal_end,)
                ).fetchone()
                assert flushed == (True,), "acknowledged before its WAL was flushed"
            assert catalog.ids(["id0", "id1"]) == {"id0"}
        finally:
            catalog.close()
