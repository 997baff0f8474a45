"""The catalog contract, run against both catalogs (SQLite in a temporary folder, PostgreSQL in
a throwaway cluster from tests/postgres.py), then what only the shared PostgreSQL catalog
promises: several writers at once, a change log in commit order, replicas creating the
schema at the same moment, outages, and notifications."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from batchserve.errors import NotReady
from batchserve.storage import postgres as pg_catalog
from batchserve.storage.catalog import ChangeLogPruned, ModelMismatch
from batchserve.storage.listener import ChangeListener
from batchserve.storage.postgres import CatalogUnavailable, PostgresCatalog, id_lock_key
from batchserve.storage.postgres_schema import LOG_LOCK
from batchserve.storage.records import NewItem
from batchserve.storage.sqlite import SqliteCatalog
from tests.postgres import PostgresCluster, free_port

DIM = 8
MODEL = {"name": "m1", "dim": DIM, "weights_sha256": "a" * 64}
OTHER_MODEL = {"name": "m2", "dim": DIM, "weights_sha256": "b" * 64}
#: A bounded wait is asserted as its configured bound plus this: far above any machine's
#: jitter, far below what an unbounded wait would take (the pool's 30 s, a hung socket).
MARGIN_S = 5.0

AnyCatalog = SqliteCatalog | PostgresCatalog


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def item(i: int, label: str | None = "a", **kwargs: Any) -> NewItem:
    return NewItem(f"id{i}", vec(i), label, {"i": i}, **kwargs)


def replay(changes: list[tuple[int, str, int]], live: set[int] | None = None) -> set[int]:
    """Apply a change log to a set of live fids, strictly: a fid is added once, while not
    live, and deleted only while live; seqs ascend."""
    live = set() if live is None else live
    last = 0
    for seq, op, fid in changes:
        assert seq > last, f"seq {seq} after {last}"
        last = seq
        if op == "add":
            assert fid not in live, f"fid {fid} added twice"
            live.add(fid)
        else:
            assert op == "del", op
            assert fid in live, f"fid {fid} deleted while not live"
            live.remove(fid)
    return live


def table_fids(catalog: AnyCatalog) -> set[int]:
    return {int(f) for fids, _v in catalog.vectors() for f in fids}


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyCatalog]:
    opened: AnyCatalog
    if request.param == "sqlite":
        opened = SqliteCatalog(tmp_path / "catalog.sqlite3", DIM)
    else:
        opened = PostgresCatalog(request.getfixturevalue("pg_url"), DIM)
    yield opened
    opened.close()


# -- the contract: both catalogs --------------------------------------------------------------


def test_an_empty_catalog_has_nothing(catalog: AnyCatalog) -> None:
    assert catalog.count() == 0
    assert catalog.last_seq() == 0
    assert catalog.changes_since(0) == []
    assert list(catalog.vectors()) == []
    assert list(catalog.groups()) == []
    assert catalog.page(10) == []
    assert catalog.items_by_fid([]) == {}
    assert catalog.ids([]) == set()
    assert catalog.get("id0") is None


def test_upsert_returns_the_new_fids_in_order_and_the_replaced_ones(catalog: AnyCatalog) -> None:
    fids, replaced = catalog.upsert([item(0), item(1), item(2)])
    assert replaced == []
    assert fids == sorted(fids) and len(set(fids)) == 3
    again, replaced = catalog.upsert([item(1, "b"), item(3)])
    assert replaced == [fids[1]]
    assert min(again) > max(fids)
    assert catalog.count() == 4
    got = catalog.get("id1")
    assert got is not None and got.fid == again[0] and got.label == "b"


def test_an_id_twice_in_one_batch_keeps_the_last(catalog: AnyCatalog) -> None:
    fids, replaced = catalog.upsert([item(0, "first"), item(0, "second")])
    assert replaced == [fids[0]]
    assert catalog.count() == 1
    got = catalog.get("id0")
    assert got is not None and (got.fid, got.label) == (fids[1], "second")
    assert replay(catalog.changes_since(0)) == {fids[1]}


def test_fids_are_never_reused(catalog: AnyCatalog) -> None:
    (first,), _ = catalog.upsert([item(0)])
    assert catalog.delete("id0") == first
    (second,), replaced = catalog.upsert([item(0)])
    assert replaced == [] and second > first


def test_delete_returns_the_fid_once(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(0, thumbnail=b"jpeg"), item(1)])
    assert catalog.delete("id0") == fids[0]
    assert catalog.delete("id0") is None
    assert catalog.delete("never") is None
    assert catalog.get("id0") is None and catalog.thumbnail("id0") is None
    assert catalog.count() == 1


def test_get_returns_every_field(catalog: AnyCatalog) -> None:
    metadata = {"n": 1, "x": 0.5, "s": "é ✓", "nested": {"list": [1, None, True]}}
    before = time.time()
    (fid,), _ = catalog.upsert([NewItem("a/b c", vec(0), "dog", metadata, "beagle")])
    got = catalog.get("a/b c")
    assert got is not None
    assert (got.fid, got.id, got.label, got.predicted_class) == (fid, "a/b c", "dog", "beagle")
    assert got.metadata == metadata
    assert before - 1 <= got.created <= time.time() + 1
    catalog.upsert([NewItem("bare", vec(1))])
    bare = catalog.get("bare")
    assert bare is not None and (bare.label, bare.predicted_class, bare.metadata) == (
        None,
        None,
        {},
    )


def test_page_lists_newest_first_before_a_fid(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(i) for i in range(5)])
    assert [i.fid for i in catalog.page(3)] == fids[::-1][:3]
    assert [i.fid for i in catalog.page(3, before_fid=fids[2])] == [fids[1], fids[0]]
    assert catalog.page(3, before_fid=fids[0]) == []


def test_thumbnail_says_whether_an_item_has_one(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(0, thumbnail=b"\xff\xd8jpeg"), item(1)])
    assert catalog.thumbnail("id0") == (fids[0], b"\xff\xd8jpeg")
    assert catalog.thumbnail("id1") == (fids[1], None)
    assert catalog.thumbnail("id2") is None
    catalog.upsert([item(0)])  # replaced without a thumbnail: the old one goes
    found = catalog.thumbnail("id0")
    assert found is not None and found[1] is None


def test_local_features_live_and_die_with_their_items(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(0, features=b"\x01orb0"), item(1), item(2, features=b"orb2")])
    assert catalog.local_features([fids[2], fids[1], fids[0], fids[2], 10_000]) == {
        fids[0]: b"\x01orb0",
        fids[2]: b"orb2",
    }
    new, _ = catalog.upsert([item(0)])  # replaced without features: the old ones go
    catalog.delete("id2")
    assert catalog.local_features([*fids, *new]) == {}


def test_items_by_fid_skips_missing_fids_and_repeats(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(i) for i in range(3)])
    found = catalog.items_by_fid([fids[2], fids[0], fids[2], 10_000])
    assert sorted(found) == [fids[0], fids[2]]
    assert found[fids[2]].id == "id2"


def test_embedding_round_trips_float32(catalog: AnyCatalog) -> None:
    (fid,), _ = catalog.upsert([item(7)])
    found = catalog.embedding("id7")
    assert found is not None
    assert found[0] == fid and found[1].dtype == np.float32
    np.testing.assert_array_equal(found[1], vec(7))
    assert catalog.embedding("id8") is None


def test_vectors_of_every_row_come_in_chunks_by_ascending_fid(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(i) for i in range(7)])
    chunks = list(catalog.vectors(chunk=3))
    assert [len(f) for f, _v in chunks] == [3, 3, 1]
    got_fids = np.concatenate([f for f, _v in chunks])
    got = np.concatenate([v for _f, v in chunks])
    assert got_fids.dtype == np.int64 and got.dtype == np.float32 and got.shape == (7, DIM)
    assert list(got_fids) == fids
    np.testing.assert_array_equal(got, np.stack([vec(i) for i in range(7)]))


def test_vectors_of_given_fids_skip_missing_ones(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(i) for i in range(5)])
    chunks = list(catalog.vectors([fids[3], fids[1], fids[3], 10_000]))
    got_fids = np.concatenate([f for f, _v in chunks])
    got = np.concatenate([v for _f, v in chunks])
    assert sorted(got_fids) == [fids[1], fids[3]]
    for fid, vector in zip(got_fids, got, strict=True):
        np.testing.assert_array_equal(vector, vec(fids.index(fid)))
    assert list(catalog.vectors([])) == []


def test_groups_and_ids(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(0, "a"), item(1, None, predicted_class="cat"), item(2, "b")])
    assert set(catalog.groups()) == {
        (fids[0], "a", None),
        (fids[1], None, "cat"),
        (fids[2], "b", None),
    }
    assert catalog.ids(["id0", "id2", "id9"]) == {"id0", "id2"}


def test_changes_since_lists_adds_and_deletes_in_order(catalog: AnyCatalog) -> None:
    fids, _ = catalog.upsert([item(0), item(1)])
    catalog.delete("id0")
    (new,), _ = catalog.upsert([item(1)])
    changes = catalog.changes_since(0)
    assert [(op, fid) for _s, op, fid in changes] == [
        ("add", fids[0]),
        ("add", fids[1]),
        ("del", fids[0]),
        ("del", fids[1]),
        ("add", new),
    ]
    assert catalog.last_seq() == changes[-1][0]
    assert catalog.changes_since(changes[1][0]) == changes[2:]
    assert catalog.changes_since(catalog.last_seq()) == []


def test_changes_since_stops_at_the_limit(catalog: AnyCatalog) -> None:
    catalog.upsert([item(i) for i in range(5)])
    everything = catalog.changes_since(0)
    assert catalog.changes_since(0, limit=2) == everything[:2]
    assert catalog.changes_since(everything[1][0], limit=2) == everything[2:4]
    assert catalog.changes_since(everything[3][0], limit=2) == everything[4:]


def test_a_wrong_dimension_is_refused_and_nothing_is_written(catalog: AnyCatalog) -> None:
    with pytest.raises(ValueError, match=f"{DIM} values"):
        catalog.upsert([item(0), NewItem("bad", np.zeros(DIM + 1, dtype=np.float32))])
    assert catalog.count() == 0 and catalog.last_seq() == 0


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_catalog_of_item_views_keeps_them_after_the_embedding(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    views: AnyCatalog = (
        SqliteCatalog(tmp_path / "catalog.sqlite3", DIM, views=2)
        if kind == "sqlite"
        else PostgresCatalog(request.getfixturevalue("pg_url"), DIM, views=2)
    )
    extra = np.stack([vec(10), vec(11)])
    views.upsert([item(0, views=extra)])
    ((_fids, stored),) = list(views.vectors())
    assert stored.shape == (1, 3, DIM)
    np.testing.assert_array_equal(stored[0], np.vstack([vec(0)[None], extra]))
    found = views.embedding("id0")
    assert found is not None and np.array_equal(found[1], vec(0))  # the whole image's only
    with pytest.raises(ValueError, match=r"its embedding and 2 views: \[3, 8\]"):
        views.upsert([item(1)])  # an item without its views
    assert views.count() == 1
    views.close()


def test_commits_counts_write_transactions(catalog: AnyCatalog) -> None:
    start = catalog.commits
    catalog.upsert([item(0), item(1)])
    catalog.upsert([item(2)])
    catalog.delete("id0")
    assert catalog.commits == start + 3


def test_check_model_records_the_model_and_refuses_another(catalog: AnyCatalog) -> None:
    catalog.check_model(MODEL)
    catalog.check_model(dict(MODEL))
    with pytest.raises(ModelMismatch) as raised:
        catalog.check_model(OTHER_MODEL)
    message = str(raised.value)
    assert "m1" in message and "m2" in message and "use another" in message


def test_meta_round_trips(catalog: AnyCatalog) -> None:
    assert catalog.get_meta("demo_seeded") is None
    catalog.set_meta("demo_seeded", "1")
    catalog.set_meta("demo_seeded", "2")
    assert catalog.get_meta("demo_seeded") == "2"


# -- PostgreSQL only --------------------------------------------------------------------------


SHARED_IDS = 12


def write_rounds(url: str, seed: int, rounds: int) -> int:
    """Upsert shuffled batches of the same ids (and now and then delete one); return the
    number of writes. Run in its own process or thread, with its own catalog."""
    catalog = PostgresCatalog(url, DIM)
    rng = random.Random(seed)
    ids = list(range(SHARED_IDS))
    try:
        for _ in range(rounds):
            if rng.random() < 0.2:
                catalog.delete(f"id{rng.choice(ids)}")
            else:
                batch = rng.sample(ids, k=rng.randint(1, len(ids)))
                catalog.upsert([item(i, label=f"writer{seed}") for i in batch])
        return rounds
    finally:
        catalog.close()


def run_threads(*targets: Callable[[], object]) -> None:
    """Run ``targets`` at once, each in a thread; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def run(target: Callable[[], object]) -> None:
        try:
            start.wait()
            target()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    if errors:
        raise errors[0]


def test_two_processes_upserting_the_same_ids_leave_one_row_each_and_a_consistent_log(
    pg_url: str,
) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        done = pool.starmap(write_rounds, [(pg_url, 1, 150), (pg_url, 2, 150)])
    assert done == [150, 150]
    catalog = PostgresCatalog(pg_url, DIM)
    try:
        live = replay(catalog.changes_since(0))
        assert live == table_fids(catalog)
        items = catalog.items_by_fid(sorted(live))
        assert len({i.id for i in items.values()}) == len(items) == catalog.count()
        assert {i.label for i in items.values()} <= {"writer1", "writer2"}
    finally:
        catalog.close()


def test_a_follower_reading_the_log_while_others_write_misses_nothing(pg_url: str) -> None:
    follower = PostgresCatalog(pg_url, DIM)
    writing = threading.Event()
    live: set[int] = set()
    reads = 0

    def follow() -> None:
        nonlocal reads
        last = 0
        while writing.is_set() or reads == 0:
            changes = follower.changes_since(last, limit=50)
            replay(changes, live)
            if changes:
                last = changes[-1][0]
            reads += 1
        replay(follower.changes_since(last), live)

    pending = [2]
    lock = threading.Lock()

    def write(seed: int) -> None:
        try:
            write_rounds(pg_url, seed, 150)
        finally:
            with lock:
                pending[0] -= 1
                if not pending[0]:
                    writing.clear()

    writing.set()
    try:
        run_threads(follow, lambda: write(1), lambda: write(2))
        assert reads > 10, "the follower did not read while the others wrote"
        assert live == table_fids(follower)
    finally:
        follower.close()


def test_writers_locking_the_same_ids_in_opposite_orders_do_not_deadlock(pg_url: str) -> None:
    writers = [PostgresCatalog(pg_url, DIM), PostgresCatalog(pg_url, DIM)]
    try:
        with psycopg.connect(pg_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (id_lock_key("id0"),))
            # Both writers queue behind the holder, the first one first; once it lets go,
            # each needs both ids. Taken in the batch's order, the first would take id0 and
            # wait for id1, which the second took, and PostgreSQL would fail one of them.
            batches = ([item(0), item(1)], [item(1), item(0)])
            with ThreadPoolExecutor(2) as pool:
                done = []
                for queued, (writer, batch) in enumerate(zip(writers, batches, strict=True)):
                    done.append(pool.submit(writer.upsert, batch))
                    deadline = time.monotonic() + 10
                    while waiting_advisory_locks(holder) <= queued:
                        assert time.monotonic() < deadline, "the writers did not queue"
                        time.sleep(0.01)
                holder.rollback()
                for future in done:
                    future.result(timeout=30)
        assert writers[0].count() == 2
        assert replay(writers[0].changes_since(0)) == table_fids(writers[0])
    finally:
        for w in writers:
            w.close()


def waiting_advisory_locks(conn: psycopg.Connection[Any]) -> int:
    """Advisory locks that sessions wait for (``conn`` is inside its own transaction)."""
    with psycopg.connect(conn.info.dsn, autocommit=True) as other:
        row = other.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
    return 0 if row is None else int(row[0])


def test_replicas_starting_at_once_on_an_empty_database_all_create_the_schema(
    pg_url: str,
) -> None:
    opened: list[PostgresCatalog] = []
    refused: list[str] = []

    def start(model: dict[str, object]) -> None:
        catalog = PostgresCatalog(pg_url, DIM)
        opened.append(catalog)
        try:
            catalog.check_model(model)
        except ModelMismatch as e:
            refused.append(str(e))

    try:
        run_threads(*(lambda m=m: start(m) for m in (MODEL, MODEL, MODEL, OTHER_MODEL)))
        assert len(opened) == 4
        # Whichever model came first is the catalog's; the others are refused.
        assert len(refused) in (1, 3)
        opened[0].upsert([item(0)])
        assert all(c.count() == 1 for c in opened)
    finally:
        for c in opened:
            c.close()


def test_an_outage_fails_calls_quickly_and_the_same_catalog_recovers(
    postgres: PostgresCluster, pg_url: str
) -> None:
    catalog = PostgresCatalog(pg_url, DIM, connect_timeout_s=2.0)
    listener = ChangeListener(pg_url)
    try:
        catalog.upsert([item(0)])
        assert listener.wait(0.05) is True  # connected
        postgres.stop()
        try:
            for call in (lambda: catalog.upsert([item(1)]), catalog.count):
                started = time.monotonic()
                with pytest.raises(CatalogUnavailable) as raised:
                    call()
                assert (
                    time.monotonic() - started < 2.0 + MARGIN_S
                )  # the 2 s timeout, not the pool's 30 s
                assert (
                    raised.value.retry_after_s == 1 and raised.value.code == "catalog_unavailable"
                )
                assert isinstance(raised.value, NotReady)
            started = time.monotonic()
            assert listener.wait(0.5) is False
            assert time.monotonic() - started < 0.5 + MARGIN_S
        finally:
            postgres.start()
        started = time.monotonic()
        while True:
            try:
                catalog.upsert([item(1)])
                break
            except CatalogUnavailable:
                assert time.monotonic() - started < 15, "the catalog did not reconnect"
                time.sleep(0.2)
        assert catalog.ids(["id0", "id1"]) == {"id0", "id1"}
        assert listener.wait(5.0) is True  # reconnected: read the log
    finally:
        listener.close()
        catalog.close()


def test_an_unreachable_server_is_refused_at_start_quickly_its_address_in_the_log_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(CatalogUnavailable) as raised:
        PostgresCatalog(f"postgresql://postgres@127.0.0.1:{port}/nothing", DIM, connect_timeout_s=2)
    assert time.monotonic() - started < 2 + MARGIN_S  # refused at once: never the pool's 30 s
    assert str(raised.value) == "the shared catalog is unavailable"  # what a client reads
    assert f"postgresql://127.0.0.1:{port}/nothing" in raised.value.detail
    assert f"postgresql://127.0.0.1:{port}/nothing" in caplog.text


def test_a_write_waiting_past_the_statement_timeout_is_unavailable(pg_url: str) -> None:
    catalog = PostgresCatalog(pg_url, DIM, statement_timeout_s=0.5)
    try:
        with psycopg.connect(pg_url) as holder:
            # Another writer holding the log lock (as if stuck before its commit).
            holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", LOG_LOCK)
            started = time.monotonic()
            with pytest.raises(CatalogUnavailable) as raised:
                catalog.upsert([item(0)])
            assert "statement timeout" in raised.value.detail
            assert 0.4 < time.monotonic() - started < 0.5 + MARGIN_S
            holder.rollback()
        catalog.upsert([item(0)])
        assert catalog.count() == 1
    finally:
        catalog.close()


def test_a_read_of_every_row_left_half_way_gives_its_connection_back(pg_url: str) -> None:
    catalog = PostgresCatalog(pg_url, DIM, pool_min=1, pool_max=1)
    try:
        catalog.upsert([item(i) for i in range(5)])
        for read in (lambda: catalog.vectors(chunk=2), catalog.groups):
            rows = read()
            next(iter(rows))
            rows.close()  # as when a caller breaks out of its loop
            assert catalog.count() == 5  # the one connection is back in the pool
    finally:
        catalog.close()


def test_a_read_of_every_row_fetches_at_most_its_bytes_at_a_time(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each fetch must arrive within the statement's bound, however large the rows: at most
    # _FETCH_BYTES of vectors (here three rows' worth), whatever chunk the caller asks.
    monkeypatch.setattr(pg_catalog, "_FETCH_BYTES", 3 * 4 * DIM)
    catalog = PostgresCatalog(pg_url, DIM)
    try:
        fids, _ = catalog.upsert([item(i) for i in range(7)])
        assert [len(f) for f, _v in catalog.vectors(chunk=10_000)] == [3, 3, 1]
        assert [len(f) for f, _v in catalog.vectors(fids, chunk=10_000)] == [3, 3, 1]
    finally:
        catalog.close()


def test_a_listener_wakes_when_another_catalog_writes(pg_url: str) -> None:
    writer = PostgresCatalog(pg_url, DIM)
    listener = ChangeListener(pg_url)
    try:
        assert listener.wait(0.05) is True  # connected: whatever came before, read the log
        assert listener.wait(0.05) is False
        writer.upsert([item(0)])
        assert listener.wait(5.0) is True
        writer.delete("id0")
        assert listener.wait(5.0) is True
        assert listener.wait(0.05) is False
    finally:
        listener.close()
        writer.close()


def test_commits_wait_for_the_wal_flush_even_where_the_server_says_not_to(
    postgres: PostgresCluster, pg_url: str
) -> None:
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        name = pg_url.rsplit("/", 1)[1]
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name))
        )
    catalog = PostgresCatalog(pg_url, DIM)
    try:
        durability = catalog.durability()
        assert durability["engine"] == "postgresql"
        assert durability["synchronous_commit"] == "on"
        assert durability["fsync"] == "on"
    finally:
        catalog.close()


# -- the change log's retention -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def pruning(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyCatalog]:
    """A catalog whose log is pruned as far as asked: no retention, no replica recorded."""
    opened: AnyCatalog
    if request.param == "sqlite":
        opened = SqliteCatalog(tmp_path / "catalog.sqlite3", DIM)
    else:
        opened = PostgresCatalog(request.getfixturevalue("pg_url"), DIM, change_log_retention_s=0)
    yield opened
    opened.close()


def test_a_pruned_log_is_read_only_from_after_its_last_pruned_change(pruning: AnyCatalog) -> None:
    pruning.upsert([item(i) for i in range(5)])
    changes = pruning.changes_since(0)
    assert pruning.pruned_seq() == 0
    assert pruning.prune_changes(changes[2][0]) == 3
    assert pruning.pruned_seq() == changes[2][0]
    assert pruning.changes_since(changes[2][0]) == changes[3:]
    for behind in (0, changes[1][0]):  # a replay from there would miss changes
        with pytest.raises(ChangeLogPruned) as pruned:
            pruning.changes_since(behind)
        assert pruned.value.pruned_seq == changes[2][0]
    assert pruning.prune_changes(changes[-1][0]) == 2
    assert pruning.last_seq() == changes[-1][0]  # the last change, though none is left
    (fid,), _ = pruning.upsert([item(9)])
    assert pruning.changes_since(changes[-1][0]) == [(changes[-1][0] + 1, "add", fid)]


def catalog_with(url: str, retention_s: float = 0.0, expiry_s: float = 3600.0) -> PostgresCatalog:
    return PostgresCatalog(url, DIM, change_log_retention_s=retention_s, replica_expiry_s=expiry_s)


def log_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM changes").fetchone()
    return 0 if row is None else int(row[0])


def test_the_log_is_kept_for_the_slowest_live_replica(pg_url: str) -> None:
    catalog = catalog_with(pg_url)
    try:
        catalog.upsert([item(i) for i in range(10)])
        catalog.record_replica("fast", 10)
        catalog.record_replica("slow", 4)
        assert catalog.prune_changes(10) == 4 and catalog.pruned_seq() == 4
        assert len(catalog.changes_since(4)) == 6
        catalog.record_replica("slow", 7)
        assert catalog.prune_changes(5) == 1  # nor past what the caller asks
        assert catalog.prune_changes(10) == 2 and log_rows(pg_url) == 3
    finally:
        catalog.close()


def test_the_log_is_kept_for_its_retention_whatever_the_replicas_applied(pg_url: str) -> None:
    keeping = catalog_with(pg_url, retention_s=3600)
    try:
        keeping.upsert([item(i) for i in range(10)])
        keeping.record_replica("only", 10)
        assert keeping.prune_changes(10) == 0 and keeping.pruned_seq() == 0
        with psycopg.connect(pg_url, autocommit=True) as conn:  # six of them an hour old
            conn.execute("UPDATE changes SET at = at - interval '61 minutes' WHERE seq <= 6")
        assert keeping.prune_changes(10) == 6 and keeping.pruned_seq() == 6
    finally:
        keeping.close()


def test_a_replica_not_seen_within_the_expiry_no_longer_holds_the_log(pg_url: str) -> None:
    catalog = catalog_with(pg_url, expiry_s=3600)
    try:
        catalog.upsert([item(i) for i in range(10)])
        catalog.record_replica("gone", 2)
        catalog.record_replica("here", 10)
        assert catalog.prune_changes(10) == 2
        with psycopg.connect(pg_url, autocommit=True) as conn:  # as if a day had passed
            conn.execute("UPDATE replicas SET seen = seen - interval '1 day' WHERE id = 'gone'")
        assert catalog.prune_changes(10) == 8 and log_rows(pg_url) == 0
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("SELECT id FROM replicas").fetchall() == [("here",)]
    finally:
        catalog.close()


def test_a_pass_deletes_at_most_its_batches_of_a_thousand_changes(pg_url: str) -> None:
    catalog = catalog_with(pg_url)
    try:
        catalog.upsert([item(i) for i in range(2500)])
        assert catalog.prune_changes(2500, batches=1) == 1000
        assert catalog.prune_changes(2500, batches=1) == 1000
        assert catalog.prune_changes(2500) == 500 and catalog.pruned_seq() == 2500
    finally:
        catalog.close()


def test_a_log_from_before_retention_gets_its_times_and_a_replicas_table(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the schema as it was
        conn.execute(
            "CREATE TABLE changes (seq bigserial PRIMARY KEY, "
            "op text NOT NULL CHECK (op IN ('add', 'del')), fid bigint NOT NULL)"
        )
        conn.execute("INSERT INTO changes (op, fid) VALUES ('add', 1), ('add', 2)")
    catalog = catalog_with(pg_url, retention_s=3600)
    try:
        catalog.record_replica("r", 2)
        assert catalog.prune_changes(2) == 0  # logged "now", as far as retention goes
        assert [seq for seq, _op, _fid in catalog.changes_since(0)] == [1, 2]
        catalog.upsert([item(0)])
        assert catalog.last_seq() == 3
    finally:
        catalog.close()
