"""The change log of a shared PostgreSQL catalog is pruned, and replicas live with it: item
stores on real FAISS indexes over one throwaway PostgreSQL database, as replicas are (each with
its data dir and its own catalog connection). A replica down while 5,000 changes are made and
pruned comes back and rebuilds its index from the catalog (its items are the catalog's), while
one that is back within its expiry replays what it missed; through 20,000 changes in batches,
with the replicas' periodic passes in between, the log stays under its bound. A server back
behind the pruned log (the real model) says in its log and /v1/index that it rebuilt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest

from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.postgres import PostgresCatalog
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore, SearchQuery
from tests.integration.conftest import start_server, stop_server

DIM = 8
MODEL = {"name": "m", "weights_sha256": "abc", "dim": DIM}


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def items(ids: range, round_: int = 0) -> list[NewItem]:
    return [NewItem(f"id{i}", vec(i + 100_000 * round_), "a", {"round": round_}) for i in ids]


def replica(directory: Path, pg_url: str) -> ItemStore:
    """A replica's store: no retention (changes every live replica applied are pruned at
    once), the default expiry of a replica's record (a day)."""
    catalog = PostgresCatalog(pg_url, DIM, change_log_retention_s=0)
    return ItemStore(directory, VectorIndex(DIM, IndexParams()), dict(MODEL), catalog=catalog)


def index_ids(store: ItemStore) -> set[str]:
    """The ids of every item in the store's (flat) index."""
    return {m.id for m in store.search([SearchQuery(vec(0), k=10_000)])[0]}


def catalog_ids(pg_url: str) -> set[str]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return {str(row[0]) for row in conn.execute("SELECT id FROM items")}


def log_rows(pg_url: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM changes").fetchone()
    return 0 if row is None else int(row[0])


def five_thousand_changes(writer: ItemStore) -> None:
    """Replacements (a delete and an add each), adds and deletes: 5,000 changes, the
    writer's periodic pass after each batch."""
    for round_ in range(1, 5):  # 4 x 500 replacements: 4,000
        writer.add(items(range(500), round_))
        writer.prune_change_log()
    writer.add(items(range(500, 1000)))  # 500
    for i in range(0, 1000, 2):  # 500
        assert writer.delete(f"id{i}")
    writer.prune_change_log()


def test_a_replica_down_past_its_expiry_while_5000_changes_are_pruned_rebuilds_when_back(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = replica(tmp_path / "writer", pg_url)
    writer.open()
    writer.add(items(range(500)))
    away = replica(tmp_path / "away", pg_url)
    away.open()
    assert away.snapshot() is not None and index_ids(away) == index_ids(writer)
    snapshot_seq = away.applied_seq
    away.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as if it had been away for a day
        conn.execute(
            "UPDATE replicas SET seen = seen - interval '25 hours' WHERE id = %s",
            (away.replica_id,),
        )
    five_thousand_changes(writer)
    assert writer.catalog.pruned_seq() == writer.applied_seq == snapshot_seq + 5000
    assert log_rows(pg_url) == 0

    back = replica(tmp_path / "away", pg_url)
    with caplog.at_level("WARNING", logger="batchserve.storage.store"):
        report = back.open()  # the server is ready only once this returns
    try:
        assert report.rebuilt and report.behind_horizon and report.snapshot_seq is None
        assert "rebuilding the index from the catalog instead of replaying" in caplog.text
        assert index_ids(back) == catalog_ids(pg_url) == index_ids(writer)
        assert len(index_ids(back)) == 500
        for i in (1, 499, 501, 999):  # the vectors of the last writes, not the snapshot's
            seed = i + 100_000 * 4 if i < 500 else i
            assert back.search([SearchQuery(vec(seed), k=1)])[0][0].id == f"id{i}"
        state = back.describe()
        assert state.change_log is not None and state.change_log.rebuilt_behind_horizon == 1
        assert back.applied_seq == writer.applied_seq and back.behind() == 0
    finally:
        back.close()
        writer.close()


def test_a_replica_back_within_its_expiry_held_the_log_and_replays_it(
    tmp_path: Path, pg_url: str
) -> None:
    writer = replica(tmp_path / "writer", pg_url)
    writer.open()
    writer.add(items(range(500)))
    away = replica(tmp_path / "away", pg_url)
    away.open()
    away.snapshot()
    snapshot_seq = away.applied_seq
    away.close()
    five_thousand_changes(writer)
    assert writer.catalog.pruned_seq() <= snapshot_seq and log_rows(pg_url) == 5000

    back = replica(tmp_path / "away", pg_url)
    report = back.open()
    try:
        assert not report.rebuilt and not report.behind_horizon
        assert report.snapshot_seq == snapshot_seq and report.replayed == 5000
        assert index_ids(back) == catalog_ids(pg_url)
        back.prune_change_log()  # its periodic pass: the log it held can go
        assert log_rows(pg_url) == 0
    finally:
        back.close()
        writer.close()


def test_the_log_stays_under_its_bound_through_50000_changes(tmp_path: Path, pg_url: str) -> None:
    writer = replica(tmp_path / "writer", pg_url)
    follower = replica(tmp_path / "follower", pg_url)
    writer.open()
    writer.add(items(range(500)))
    follower.open()
    batch = 1000  # changes: 500 replacements
    try:
        for round_ in range(1, 51):
            writer.add(items(range(500), round_))
            # Before the passes: this batch, and the last one if the follower has not
            # applied it yet.
            assert log_rows(pg_url) <= 2 * batch, round_
            if round_ % 2:  # the follower's periodic pass comes every other batch
                follower.catch_up()
                follower.prune_change_log()
            writer.prune_change_log()
            # After them: at most the batch the follower has not applied.
            assert log_rows(pg_url) <= batch, round_
        assert writer.applied_seq == 500 + 50 * batch
        follower.catch_up()
        assert index_ids(follower) == catalog_ids(pg_url) and follower.rebuilt_behind_horizon == 0
    finally:
        follower.close()
        writer.close()


def test_a_server_back_behind_the_pruned_log_says_it_rebuilt_in_its_log_and_v1_index(
    tmp_path: Path, pg_url: str
) -> None:
    args = ("--catalog", pg_url, "--no-demo", "--change-log-retention-s", "0")
    server = start_server(tmp_path, *args)
    try:
        first = server.request("GET", "/v1/index").json()
        assert first["catalog"]["rebuilt_behind_horizon"] == first["catalog"]["pruned_seq"] == 0
    finally:
        stop_server(server)  # its final snapshot, at change 0
    with psycopg.connect(pg_url, autocommit=True) as conn:  # away for a day
        conn.execute("UPDATE replicas SET seen = seen - interval '25 hours'")
    # Another replica's writes, and its pass pruning them: vectors of the served model's shape.
    dim, views = first["dim"], first["vectors_per_item"] - 1
    writer = PostgresCatalog(pg_url, dim, views, change_log_retention_s=0)
    try:
        rows = np.random.default_rng(0).normal(size=(3, 1 + views, dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
        writer.upsert([NewItem(f"w{i}", row if views else row[0]) for i, row in enumerate(rows)])
        writer.record_replica("writer", writer.last_seq())
        assert writer.prune_changes(writer.last_seq()) == 3
    finally:
        writer.close()
    back = start_server(tmp_path, *args)
    try:
        index = back.request("GET", "/v1/index").json()
        assert index["size"] == 3
        assert index["catalog"]["rebuilt_behind_horizon"] == 1
        assert index["catalog"]["pruned_seq"] == index["catalog"]["applied_seq"] == 3
        assert index["catalog"]["replica_id"] == first["catalog"]["replica_id"]
        assert "rebuilding the index from the catalog instead of replaying" in back.log()
    finally:
        stop_server(back)
