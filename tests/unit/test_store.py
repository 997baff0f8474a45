"""The item store: durability through snapshots and the change log, filters, model checks.
Real SQLite and FAISS in a temporary directory; no threads."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from batchserve.errors import InvalidInput, NotReady
from batchserve.http.wire import index_json
from batchserve.storage.catalog import ChangeLogPruned, ModelMismatch
from batchserve.storage.data_dir import DataDirLocked, lock_data_dir, replica_id
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.outage import CatalogHealth, few_words
from batchserve.storage.records import (
    MAX_METADATA_DEPTH,
    Item,
    Match,
    NewItem,
    check_metadata,
)
from batchserve.storage.sqlite import SqliteCatalog
from batchserve.storage.store import ItemStore, SearchQuery

DIM = 16
MODEL = {"name": "m", "weights_sha256": "abc", "dim": DIM}


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def store(path: Path, kind: str = "flat", model: dict[str, object] = MODEL) -> ItemStore:
    s = ItemStore(path, VectorIndex(DIM, IndexParams(kind=kind, train_min=50)), dict(model))
    s.open()
    return s


def items(start: int, n: int, label: str = "a") -> list[NewItem]:
    return [NewItem(f"id{i}", vec(i), label, {"i": i}) for i in range(start, start + n)]


def top_id(s: ItemStore, seed: int) -> str:
    return s.search([SearchQuery(vec(seed), k=1)])[0][0].id


def oracle(query_seed: int, candidates: list[int], k: int) -> list[tuple[str, float]]:
    """Exact top-``k`` of ``candidates`` (seeds of ``vec``) by cosine, with the scores
    rounded as the store reports them."""
    sims = np.stack([vec(c) for c in candidates]) @ vec(query_seed)
    order = np.argsort(-sims, kind="stable")[:k]
    return [(f"id{candidates[j]}", round(float(sims[j]), 6)) for j in order]


def found(matches: list[Match]) -> list[tuple[str, float]]:
    return [(m.id, m.score) for m in matches]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_restart_loads_snapshot_and_replays_later_changes(tmp_path: Path, kind: str) -> None:
    s = store(tmp_path, kind)
    s.add(items(0, 60))
    assert s.snapshot() is not None
    s.add(items(60, 10))
    s.delete("id3")
    s.close()  # no snapshot: the last changes exist only in the catalog

    again = store(tmp_path, kind)
    assert again.index.size == 69
    assert top_id(again, 65) == "id65"
    assert all(m.id != "id3" for m in again.search([SearchQuery(vec(3), k=5)])[0])


def test_open_report_says_what_happened(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 5))
    s.snapshot()
    s.add(items(5, 2))
    s.close()
    again = ItemStore(tmp_path, VectorIndex(DIM, IndexParams()), MODEL)
    report = again.open()
    assert report.snapshot_seq == 5 and report.replayed == 2 and not report.rebuilt


def test_corrupt_snapshot_falls_back_to_an_older_one_or_a_rebuild(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 20))
    path = s.snapshot()
    assert path is not None
    s.close()
    path.write_bytes(b"not a faiss index")
    again = ItemStore(tmp_path, VectorIndex(DIM, IndexParams()), MODEL)
    report = again.open()
    assert report.rebuilt and report.skipped_snapshots
    assert again.index.size == 20 and top_id(again, 7) == "id7"


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    s = store(tmp_path)
    for start in range(0, 40, 10):
        s.add(items(start, 10))
        s.snapshot()
    assert len(list((tmp_path / "snapshots").glob("*.faiss"))) == 2
    assert s.snapshot() is None  # nothing changed since the last one


def test_another_model_is_refused(tmp_path: Path) -> None:
    store(tmp_path).close()
    other = dict(MODEL, weights_sha256="def")
    with pytest.raises(ModelMismatch, match=r"serve it with that model"):
        ItemStore(tmp_path, VectorIndex(DIM, IndexParams()), other)


def test_snapshot_of_another_index_kind_is_not_loaded(tmp_path: Path) -> None:
    s = store(tmp_path, "flat")
    s.add(items(0, 10))
    s.snapshot()
    s.close()
    again = ItemStore(tmp_path, VectorIndex(DIM, IndexParams(kind="hnsw")), MODEL)
    report = again.open()
    assert report.rebuilt and again.index.size == 10


def test_label_filter_never_returns_another_label(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 30, "a") + items(30, 30, "b"))
    for seed in range(60):
        for label in ("a", "b"):
            matches = s.search([SearchQuery(vec(seed), k=10, label=label)])[0]
            assert len(matches) == 10 and {m.label for m in matches} == {label}
    assert s.search([SearchQuery(vec(1), k=3, label="none")])[0] == []


def test_ivf_is_trained_once_enough_items_exist(tmp_path: Path) -> None:
    s = store(tmp_path, "ivf")
    s.add(items(0, 40))
    assert s.index.kind_in_use == "flat"
    s.add(items(40, 20))
    assert s.index.kind_in_use == "ivf"
    assert top_id(s, 55) == "id55"


def test_files_are_private_to_the_user(tmp_path: Path) -> None:
    s = store(tmp_path / "data")
    s.add(items(0, 2))
    s.snapshot()
    for path in [tmp_path / "data" / "catalog.sqlite3", *(tmp_path / "data").rglob("*.faiss")]:
        assert path.stat().st_mode & 0o077 == 0, path
    meta = json.loads(next((tmp_path / "data" / "snapshots").glob("*.json")).read_text())
    assert meta["count"] == 2


def test_data_dir_lock_is_exclusive(tmp_path: Path) -> None:
    import subprocess
    import sys

    lock_data_dir(tmp_path)
    code = (
        "import sys; from pathlib import Path\n"
        "from batchserve.storage.data_dir import lock_data_dir\n"
        f"lock_data_dir(Path({str(tmp_path)!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and DataDirLocked.__name__ in done.stderr


def test_deletes_past_ten_percent_compact_an_hnsw_index(tmp_path: Path) -> None:
    s = store(tmp_path, "hnsw")
    s.add(items(0, 1200))
    for i in range(120):
        s.delete(f"id{i}")
    assert s.index.tombstones == 120 and s.index.size == 1080
    s.delete("id120")  # past 10% of the 1200 stored vectors: rebuilt without the removed
    assert s.index.tombstones == 0 and s.index.size == 1079
    assert top_id(s, 500) == "id500"


def test_old_changes_are_pruned_but_the_kept_snapshots_still_replay(tmp_path: Path) -> None:
    s = store(tmp_path)
    for start in range(0, 30, 10):
        s.add(items(start, 10))
        s.snapshot()
    # Changes up to the older kept snapshot (seq 20) are gone; the first left is 21, and
    # the log is not read from before it as if complete.
    assert s.catalog.pruned_seq() == 20 and s.catalog.changes_since(20)[0][0] == 21
    with pytest.raises(ChangeLogPruned):
        s.catalog.changes_since(0)
    s.add(items(30, 5))
    s.close()
    newest = max((tmp_path / "snapshots").glob("*.faiss"))
    newest.write_bytes(b"damaged")  # fall back to the older kept snapshot and replay
    again = ItemStore(tmp_path, VectorIndex(DIM, IndexParams()), MODEL)
    report = again.open()
    assert report.snapshot_seq == 20 and again.index.size == 35


def test_a_second_server_on_a_locked_data_dir_exits_with_one_clear_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    lock_data_dir(tmp_path)
    command = [sys.executable, "-m", "batchserve.cli", "serve", "--port", "0"]
    done = subprocess.run(
        [*command, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"is in use by process {os.getpid()} (a server or an indexer)" in done.stderr
    assert "pass another --data-dir" in done.stderr and "Traceback" not in done.stderr


def test_a_snapshot_that_fails_midway_leaves_the_previous_one_to_open_from(
    tmp_path: Path,
) -> None:
    s = store(tmp_path)
    s.add(items(0, 10))
    first = s.snapshot()
    s.add(items(10, 5))

    def disk_full(path: Path) -> list[int]:
        path.write_bytes(b"\x00" * 100)  # half a file, then the disk fills up
        raise OSError(28, "No space left on device")

    s.index.write = disk_full  # type: ignore[method-assign]
    with pytest.raises(OSError):
        s.snapshot()
    assert first is not None and first.exists() and first.with_suffix(".json").exists()

    reopened = ItemStore(tmp_path, VectorIndex(DIM, IndexParams(train_min=50)), dict(MODEL))
    report = reopened.open()
    assert report.snapshot_seq == int(first.stem.split("-")[1]) and report.replayed == 5
    assert reopened.index.size == 15 and top_id(reopened, 12) == "id12"


def test_a_batch_of_adds_is_one_transaction_and_one_index_add(tmp_path: Path) -> None:
    s = store(tmp_path)
    commits, adds = s.catalog.commits, s.index.calls["add"]
    assert s.add(items(0, 8)) == [f"id{i}" for i in range(8)]
    assert s.catalog.commits - commits == 1
    assert s.index.calls["add"] - adds == 1
    assert s.index.size == 8 and s.catalog.count() == 8


def test_searches_are_one_index_call_per_distinct_filter(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 10, "a") + items(10, 10, "b"))
    before = s.index.calls["search"]
    found = s.search([SearchQuery(vec(i), k=1) for i in (1, 2, 13)])
    assert [m[0].id for m in found] == ["id1", "id2", "id13"]
    assert s.index.calls["search"] - before == 1
    s.search([SearchQuery(vec(i), k=1, label=label) for i, label in [(1, "a"), (2, "a"), (3, "b")]])
    assert s.index.calls["search"] - before == 3  # one for label a, one for label b


def test_the_live_catalog_connection_commits_durably(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.catalog.durability() == {"journal_mode": "wal", "synchronous": "full"}
    assert index_json(s.describe())["catalog"] == {
        "journal_mode": "wal",
        "synchronous": "full",
        "commits": 0,
        "applied_seq": 0,
        "behind": 0,
    }


def test_label_and_class_filters_still_find_the_items_after_a_restart(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(
        [
            NewItem(f"id{i}", vec(i), "a" if i < 6 else "b", {}, "cat" if i % 2 else "dog")
            for i in range(12)
        ]
    )
    s.snapshot()
    s.close()

    again = store(tmp_path)
    by_label = again.search([SearchQuery(vec(20), k=10, label="b")])[0]
    assert found(by_label) == oracle(20, list(range(6, 12)), 10)
    by_class = again.search([SearchQuery(vec(20), k=10, predicted_class="cat")])[0]
    assert found(by_class) == oracle(20, [1, 3, 5, 7, 9, 11], 10)
    both = again.search([SearchQuery(vec(20), k=10, label="a", predicted_class="dog")])[0]
    assert found(both) == oracle(20, [0, 2, 4], 10)


def test_a_filter_that_matches_nothing_leaves_the_other_queries_of_the_batch_alone(
    tmp_path: Path,
) -> None:
    s = store(tmp_path)
    s.add(items(0, 10, "a") + items(10, 10, "b"))
    nothing, unfiltered, label_b = s.search(
        [
            SearchQuery(vec(1), k=3, label="none"),
            SearchQuery(vec(2), k=3),
            SearchQuery(vec(3), k=2, label="b"),
        ]
    )
    assert nothing == []
    assert found(unfiltered) == oracle(2, list(range(20)), 3)
    assert found(label_b) == oracle(3, list(range(10, 20)), 2)


def test_excluding_the_query_item_still_returns_k_other_items(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 10))
    matches = s.search([SearchQuery(vec(4), k=2, exclude="id4")])[0]
    assert found(matches) == oracle(4, [i for i in range(10) if i != 4], 2)


def test_a_class_no_item_has_matches_nothing(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem(f"id{i}", vec(i), "a", {}, "cat") for i in range(5)])
    assert s.search([SearchQuery(vec(1), k=3, predicted_class="dog")]) == [[]]
    assert s.search([SearchQuery(vec(1), k=3, label="a", predicted_class="dog")]) == [[]]


def axis(*values: float) -> np.ndarray:
    return np.array([*values, *[0.0] * (DIM - len(values))], dtype=np.float32)


def test_match_scores_are_rounded_to_six_decimals(tmp_path: Path) -> None:
    s = store(tmp_path)
    diagonal = (axis(1.0, 1.0) / np.sqrt(2)).astype(np.float32)
    s.add([NewItem("x", axis(1.0), "a"), NewItem("d", diagonal, "a")])
    matches = s.search([SearchQuery(axis(1.0), k=2)])[0]
    assert found(matches) == [("x", 1.0), ("d", round(float(axis(1.0) @ diagonal), 6))]
    assert matches[1].score == 0.707107


def test_min_score_keeps_a_match_scoring_exactly_the_minimum(tmp_path: Path) -> None:
    s = store(tmp_path)
    half = axis(0.5, float(np.sqrt(0.75)))
    s.add([NewItem("x", axis(1.0)), NewItem("half", half), NewItem("y", axis(0.0, 1.0))])
    assert float(axis(1.0) @ half) == 0.5  # exact in float32
    matches = s.search([SearchQuery(axis(1.0), k=3, min_score=0.5)])[0]
    assert found(matches) == [("x", 1.0), ("half", 0.5)]


def test_describe_an_untrained_ivf_index(tmp_path: Path) -> None:
    index = VectorIndex(DIM, IndexParams(kind="ivf", train_min=50, device="cpu"))
    s = ItemStore(tmp_path, index, dict(MODEL))
    s.open()
    s.add(items(0, 3, "a") + items(3, 2, "b"))
    assert index_json(s.describe()) == {
        "kind": "ivf",
        "kind_in_use": "flat",
        "size": 5,
        "vectors_per_item": 1,
        "dim": DIM,
        "device": "cpu",
        "labels": 2,
        "calls": {"search": 0, "add": 1, "remove": 0},
        "catalog": {
            "journal_mode": "wal",
            "synchronous": "full",
            "commits": 1,
            "applied_seq": 5,
            "behind": 0,
        },
    }


def test_with_umask_0_the_data_and_snapshot_files_are_still_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = os.umask(0)
    try:
        fd = lock_data_dir(data)
        s = store(data)
        s.add(items(0, 2))
        snapshot = s.snapshot()
    finally:
        os.umask(old)
    os.close(fd)
    s.close()
    assert snapshot is not None
    paths = [data, data / "snapshots", data / "lock", snapshot.with_suffix(".json"), snapshot]
    modes = [oct(stat.S_IMODE(p.stat().st_mode)) for p in paths]
    assert modes == ["0o700", "0o700", "0o600", "0o600", "0o600"]


def test_a_data_dir_whose_parents_do_not_exist_yet_is_created(tmp_path: Path) -> None:
    data = tmp_path / "not" / "yet" / "data"
    fd = lock_data_dir(data)
    try:
        assert (data / "lock").is_file()
    finally:
        os.close(fd)


def test_a_label_is_no_longer_counted_once_its_last_item_is_deleted(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 3, "a") + items(3, 2, "b"))
    assert s.describe().labels == 2
    assert s.delete("id3") and s.delete("id4")
    assert s.describe().labels == 1
    assert s.search([SearchQuery(vec(3), k=3, label="b")]) == [[]]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_an_untrained_store_reopened_without_a_snapshot_still_serves_its_items(
    tmp_path: Path, kind: str
) -> None:
    s = store(tmp_path, kind)
    s.add(items(0, 10))
    s.close()  # never snapshotted: the index is rebuilt from the catalog

    again = ItemStore(tmp_path, VectorIndex(DIM, IndexParams(kind=kind, train_min=50)), MODEL)
    report = again.open()
    assert report.rebuilt and again.index.kind_in_use == "flat"
    assert found(again.search([SearchQuery(vec(3), k=4)])[0]) == oracle(3, list(range(10)), 4)


def test_thumbnails_live_and_die_with_their_items(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem("a", vec(1), thumbnail=b"jpeg-a"), NewItem("b", vec(2))])
    fid_a, jpeg = s.catalog.thumbnail("a") or (0, None)
    assert jpeg == b"jpeg-a" and s.catalog.thumbnail("b") == (fid_a + 1, None)
    s.add([NewItem("a", vec(3), thumbnail=b"jpeg-a2")])  # replaced: a new row, a new one
    fid, jpeg = s.catalog.thumbnail("a") or (0, None)
    assert jpeg == b"jpeg-a2" and fid != fid_a
    s.delete("a")
    assert s.catalog.thumbnail("a") is None
    s.close()
    with sqlite3.connect(tmp_path / "catalog.sqlite3") as db:
        # Nothing left behind by the replace or the delete.
        assert db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0] == 0


def test_a_catalog_from_before_local_features_opens_and_has_none(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 2))
    s.close()
    with sqlite3.connect(tmp_path / "catalog.sqlite3") as db:
        db.execute("DROP TABLE features")  # as a catalog written before them
    again = store(tmp_path)
    assert again.catalog.local_features([1, 2]) == {}
    again.add([NewItem("new", vec(9), features=b"orb")])
    assert again.catalog.local_features([3]) == {3: b"orb"}


def test_a_catalog_from_before_thumbnails_opens_and_has_none(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 2))
    s.close()
    with sqlite3.connect(tmp_path / "catalog.sqlite3") as db:
        db.execute("DROP TABLE thumbnails")  # as a catalog written before them
    again = store(tmp_path)
    assert again.catalog.thumbnail("id0") == (1, None)
    again.add([NewItem("new", vec(9), thumbnail=b"jpeg")])
    assert (again.catalog.thumbnail("new") or (0, None))[1] == b"jpeg"


def test_pages_of_items_go_newest_first_from_a_cursor(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add(items(0, 5))
    first = s.catalog.page(2)
    assert [i.id for i in first] == ["id4", "id3"]
    second = s.catalog.page(2, before_fid=first[-1].fid)
    assert [i.id for i in second] == ["id2", "id1"]
    assert [i.id for i in s.catalog.page(10, before_fid=second[-1].fid)] == ["id0"]


def follower(tmp_path: Path, writer: ItemStore) -> ItemStore:
    """A second store with its own index over the same catalog, as a replica is."""
    other = ItemStore(
        tmp_path / "replica", VectorIndex(DIM, IndexParams()), dict(MODEL), catalog=writer.catalog
    )
    other.open()
    return other


def test_a_follower_applies_anothers_writes_from_the_change_log(tmp_path: Path) -> None:
    writer = store(tmp_path / "writer")
    writer.add(items(0, 5))
    replica = follower(tmp_path, writer)
    assert replica.index.size == 5 and replica.behind() == 0
    writer.add(items(5, 3, label="b"))
    writer.add([NewItem("id0", vec(100), "a")])  # replaced: a new row
    writer.delete("id1")
    assert replica.behind() == 6
    assert replica.catch_up() == 6 and replica.behind() == 0
    assert replica.index.size == writer.index.size == 7
    for seed in (100, 6, 2):
        assert top_id(replica, seed) == top_id(writer, seed)
    assert all(m.id != "id1" for m in replica.search([SearchQuery(vec(1), k=10)])[0])
    labelled = replica.search([SearchQuery(vec(6), k=10, label="b")])[0]
    assert {m.id for m in labelled} == {"id5", "id6", "id7"}


def test_catching_up_twice_or_after_a_rebuild_changes_nothing(tmp_path: Path) -> None:
    writer = store(tmp_path / "writer")
    writer.add(items(0, 4))
    replica = follower(tmp_path, writer)
    writer.add(items(4, 2))
    writer.delete("id0")
    replica.applied_seq = 0  # as if a rebuild had read rows already past these changes
    replica.catch_up()
    replica.catch_up()
    assert replica.index.size == 5 and replica.behind() == 0
    assert {m.id for m in replica.search([SearchQuery(vec(4), k=10)])[0]} == {
        f"id{i}" for i in range(1, 6)
    }


def test_a_snapshot_holds_what_the_index_applied_and_a_restart_replays_the_rest(
    tmp_path: Path,
) -> None:
    writer = store(tmp_path / "writer")
    writer.add(items(0, 4))
    replica = follower(tmp_path, writer)
    writer.add(items(4, 2))  # not applied by the replica yet
    assert replica.snapshot() is not None
    writer.delete("id0")
    again = ItemStore(
        tmp_path / "replica", VectorIndex(DIM, IndexParams()), dict(MODEL), catalog=writer.catalog
    )
    report = again.open()
    assert report.snapshot_seq == 4 and report.replayed == 3 and not report.rebuilt
    assert again.index.size == 5 and again.behind() == 0


class Unreachable(NotReady):
    """As PostgresCatalog's CatalogUnavailable: a message for clients, and the driver's words
    (with the database's address) in ``detail``, for the log."""

    code = "catalog_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__("the shared catalog is unavailable", retry_after_s=1)
        self.detail = detail

    @property
    def reason(self) -> str:
        return few_words(self.detail) or str(self)


#: What PostgresCatalog says of a server stopped with SIGSTOP, at the first call that finds it.
HUNG = (
    "the catalog database postgresql://127.0.0.1:5432/items is unavailable: no answer from "
    "the server within 7 s; couldn't get a connection after 2.00 sec"
)


class SharedCatalog(SqliteCatalog):
    """SQLite standing in for a catalog other replicas share: while ``down``, every call
    the tests make fails with NotReady (``Unreachable``, saying ``why``), as
    PostgresCatalog's CatalogUnavailable does. ``vanished`` ids' records are not found by
    fid, as if deleted just after the log was read; ``gets`` counts reads by id, ``writes``
    upserts and deletes tried; ``recorded`` holds the replicas' records of how far they
    applied the log, in order."""

    shared = True

    def __init__(self, path: Path, dim: int = DIM) -> None:
        super().__init__(path, dim)
        self.down = False
        self.why = HUNG
        self.vanished: set[str] = set()
        self.gets = 0
        self.writes = 0
        self.recorded: list[tuple[str, int]] = []

    def record_replica(self, replica_id: str, applied_seq: int) -> None:
        self._reach()
        self.recorded.append((replica_id, applied_seq))

    def _reach(self) -> None:
        if self.down:
            raise Unreachable(self.why)

    def get(self, item_id: str) -> Item | None:
        self.gets += 1
        self._reach()
        return super().get(item_id)

    def upsert(self, items: Sequence[NewItem]) -> tuple[list[int], list[int]]:
        self.writes += 1
        self._reach()
        return super().upsert(items)

    def delete(self, item_id: str) -> int | None:
        self.writes += 1
        self._reach()
        return super().delete(item_id)

    def page(self, limit: int, before_fid: int | None = None) -> list[Item]:
        self._reach()
        return super().page(limit, before_fid)

    def items_by_fid(self, fids: Sequence[int]) -> dict[int, Item]:
        self._reach()
        found = super().items_by_fid(fids)
        return {fid: item for fid, item in found.items() if item.id not in self.vanished}

    def last_seq(self) -> int:
        self._reach()
        return super().last_seq()

    def changes_since(self, seq: int, limit: int | None = None) -> list[tuple[int, str, int]]:
        self._reach()
        return super().changes_since(seq, limit)


def shared_store(path: Path, catalog: SharedCatalog) -> ItemStore:
    s = ItemStore(path, VectorIndex(DIM, IndexParams()), dict(MODEL), catalog=catalog)
    s.open()
    return s


def replica_of_two(tmp_path: Path) -> tuple[SharedCatalog, ItemStore]:
    """A shared catalog and a replica on it that added id0 and id1."""
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    replica = shared_store(tmp_path / "replica", catalog)
    replica.add(items(0, 2))
    return catalog, replica


def test_with_the_shared_catalog_down_items_are_read_from_memory_and_writes_fail(
    tmp_path: Path,
) -> None:
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    replica = shared_store(tmp_path / "replica", catalog)
    replica.add(items(0, 3))
    replica.add([NewItem("id1", vec(101), "b", {"again": True})])  # replaced: a new row
    replica.delete("id2")
    before = {i: replica.get(i) for i in ("id0", "id1")}
    catalog.down = True
    assert {i: replica.get(i) for i in ("id0", "id1")} == before
    assert before["id1"] is not None and before["id1"].metadata == {"again": True}
    for unknown in ("id2", "never"):  # deleted, never added: perhaps added elsewhere since
        with pytest.raises(NotReady):
            replica.get(unknown)
    with pytest.raises(NotReady):
        replica.delete("id0")
    with pytest.raises(NotReady):
        replica.add(items(5, 1))
    with pytest.raises(NotReady):
        replica.catalog.page(10)
    assert replica.get("id0") == before["id0"]  # the delete did not happen
    assert replica.search([SearchQuery(vec(0), k=1)])[0][0].id == "id0"


def test_with_the_shared_catalog_up_items_are_read_from_it(tmp_path: Path) -> None:
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    replica = shared_store(tmp_path / "replica", catalog)
    writer = shared_store(tmp_path / "writer", catalog)
    writer.add(items(0, 2))
    found = replica.get("id1")  # not applied here yet: read from the catalog
    assert found is not None and found.metadata == {"i": 1} and replica.behind() == 2
    catalog.down = True
    with pytest.raises(NotReady):
        replica.get("id1")  # not in memory: 503, as the replica's searches do not see it
    catalog.down = False
    assert replica.catch_up() == 2
    writer.delete("id1")
    assert replica.get("id1") is None and replica.get("id0") is not None


def test_while_the_shared_catalog_is_out_of_reach_reads_do_not_wait_on_it(
    tmp_path: Path,
) -> None:
    catalog, replica = replica_of_two(tmp_path)
    catalog.down = True
    gets = catalog.gets
    for _ in range(3):
        assert replica.get("id0") is not None
        with pytest.raises(NotReady):
            replica.get("nope")
    assert catalog.gets == gets + 1  # one failure; then memory until the log is followed
    catalog.down = False
    replica.catch_up()  # as the follower does every interval: the catalog is back
    replica.get("id0")
    assert catalog.gets == gets + 2


def test_an_id_not_in_memory_is_503_not_404_while_the_shared_catalog_is_down(
    tmp_path: Path,
) -> None:
    catalog, replica = replica_of_two(tmp_path)
    catalog.vanished = {"id5"}  # its record gone when the row was read: replaced, say
    replica.add(items(5, 1))
    catalog.down = True
    with pytest.raises(NotReady):
        replica.get("other")  # could be the id of the row memory has no record of
    assert replica.get("id0") is not None


def test_a_shared_catalog_out_of_reach_is_reported_with_why_until_the_follower_finds_it(
    tmp_path: Path,
) -> None:
    assert store(tmp_path / "alone").catalog_health is None  # its own SQLite: no outage
    catalog, replica = replica_of_two(tmp_path)
    assert replica.catalog_health == CatalogHealth(True)
    catalog.down = True
    with pytest.raises(NotReady):
        replica.catch_up()  # the follower's pass
    assert replica.catalog_health == CatalogHealth(False, "no answer within 7 s")
    catalog.why = "couldn't get a connection after 0.25 sec"  # the calls that follow
    with pytest.raises(NotReady):
        replica.catch_up()
    assert replica.catalog_health == CatalogHealth(False, "no answer within 7 s")  # the first
    catalog.down = False
    assert replica.catalog_health == CatalogHealth(False, "no answer within 7 s")
    replica.catch_up()
    assert replica.catalog_health == CatalogHealth(True)


def test_a_failed_write_or_read_marks_the_shared_catalog_out_of_reach_too(
    tmp_path: Path,
) -> None:
    catalog, replica = replica_of_two(tmp_path)
    catalog.down = True
    with pytest.raises(NotReady):
        replica.add(items(5, 1))
    assert replica.catalog_health == CatalogHealth(False, "no answer within 7 s")
    catalog.down = False
    replica.catch_up()
    catalog.down, catalog.why = True, "connection refused"
    assert replica.get("id0") is not None  # from memory
    assert replica.catalog_health == CatalogHealth(False, "connection refused")


def test_while_the_shared_catalog_is_known_out_of_reach_writes_do_not_wait_on_it(
    tmp_path: Path,
) -> None:
    catalog, replica = replica_of_two(tmp_path)
    catalog.down = True
    with pytest.raises(NotReady):
        replica.catch_up()  # found out of reach (on a hung server: after the bound)
    writes = catalog.writes
    for write in (lambda: replica.add(items(5, 1)), lambda: replica.delete("id0")):
        with pytest.raises(NotReady) as refused:
            write()
        assert refused.value.retry_after_s == 1 and refused.value.code == "catalog_unavailable"
    assert catalog.writes == writes  # refused at once: no second wait of the bound
    catalog.down = False
    with pytest.raises(NotReady):
        replica.add(items(5, 1))  # until the follower's next pass finds it back
    replica.catch_up()
    assert replica.add(items(5, 1)) == ["id5"] and replica.delete("id0")
    assert index_ids(replica) == {"id1", "id5"}


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        (HUNG, "no answer within 7 s"),
        (
            "the catalog database postgresql://h:5432/d is unavailable: no answer from the "
            "server within 3.5 s (stopped or hung?): the connection was cut on the client side",
            "no answer within 3.5 s",
        ),
        (
            'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
            "Connection refused\n\tIs the server running on that host and accepting TCP/IP?",
            "connection refused",
        ),
        ("FATAL:  the database system is shutting down", "the database is shutting down"),
        ("server closed the connection unexpectedly", "connection lost"),
        ("couldn't get a connection after 2.00 sec", "no connection within 2 s"),
        ("something else at postgresql://secret-host:5432/d", "the shared catalog is unavailable"),
    ],
)
def test_why_the_catalog_is_out_of_reach_is_said_in_a_few_words_without_its_address(
    detail: str, reason: str
) -> None:
    assert Unreachable(detail).reason == reason
    assert NotReady("the index is loading").reason == "the index is loading"


def index_ids(s: ItemStore) -> set[str]:
    """The ids of every item the store's index holds (a flat index: every one is found)."""
    return {m.id for m in s.search([SearchQuery(vec(0), k=1000)])[0]}


def catalog_ids(catalog: SqliteCatalog) -> set[str]:
    return {item.id for item in catalog.page(1000)}


def churn(writer: ItemStore, start: int) -> None:
    """Adds, replacements and deletes: changes a replica away from the log misses."""
    writer.add(items(start, 6, label="b"))
    writer.add([NewItem("id0", vec(500), "c")])  # a new row; the old one's delete is logged
    writer.delete("id1")
    writer.delete(f"id{start}")


def behind_the_horizon(tmp_path: Path) -> tuple[SharedCatalog, ItemStore, ItemStore, int]:
    """A writer and a replica on one shared catalog, the replica having applied its log up
    to the seq returned, and the log since pruned past that."""
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    writer = shared_store(tmp_path / "writer", catalog)
    replica = shared_store(tmp_path / "replica", catalog)
    writer.add(items(0, 4))
    replica.catch_up()
    away = replica.applied_seq
    churn(writer, 10)
    assert catalog.prune_changes(catalog.last_seq() - 2) > 0  # past what the replica applied
    return catalog, writer, replica, away


def test_a_replica_behind_the_pruned_log_rebuilds_from_the_catalog_instead_of_replaying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog, writer, replica, away = behind_the_horizon(tmp_path)
    with pytest.raises(ChangeLogPruned):
        catalog.changes_since(away)  # the log from there would miss changes
    with caplog.at_level("WARNING", logger="batchserve.storage.store"):
        replica.catch_up()
    assert index_ids(replica) == catalog_ids(catalog) == index_ids(writer)
    assert replica.applied_seq == catalog.last_seq() and replica.behind() == 0
    assert "rebuilding the index from the catalog" in caplog.text
    assert (
        replica.get("id1") is None
        and replica.search([SearchQuery(vec(500), k=1)])[0][0].id == "id0"
    )
    state = index_json(replica.describe())["catalog"]
    assert state["rebuilt_behind_horizon"] == 1 and state["pruned_seq"] == catalog.pruned_seq()
    assert state["replica_id"] == replica.replica_id != writer.replica_id
    assert replica.snapshot() is not None  # the index no snapshot held is written down


def test_a_replica_is_marked_rebuilding_while_it_rebuilds_behind_the_horizon(
    tmp_path: Path,
) -> None:
    _catalog, _writer, replica, _away = behind_the_horizon(tmp_path)
    seen: list[bool] = []
    rebuild = replica._rebuild

    def watched() -> None:
        seen.append(replica.rebuilding)  # as /readyz reads it from the reactor thread
        rebuild()

    replica._rebuild = watched  # type: ignore[method-assign]
    assert not replica.rebuilding
    replica.catch_up()
    assert seen == [True] and not replica.rebuilding


def test_a_snapshot_older_than_the_pruned_log_is_not_replayed(tmp_path: Path) -> None:
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    writer = shared_store(tmp_path / "writer", catalog)
    writer.add(items(0, 4))
    replica = shared_store(tmp_path / "replica", catalog)
    assert replica.snapshot() is not None
    churn(writer, 10)
    catalog.prune_changes(catalog.last_seq())  # every change: nothing left to replay
    again = ItemStore(tmp_path / "replica", VectorIndex(DIM, IndexParams()), dict(MODEL), catalog)
    report = again.open()
    assert report.rebuilt and report.behind_horizon and report.snapshot_seq is None
    assert index_ids(again) == catalog_ids(catalog) and again.behind() == 0
    assert again.rebuilt_behind_horizon == 1 and again.replica_id == replica.replica_id
    assert catalog.recorded[-1] == (again.replica_id, catalog.last_seq())  # before the rebuild


def test_a_log_pruned_to_its_last_change_is_complete_from_there(tmp_path: Path) -> None:
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    writer = shared_store(tmp_path / "writer", catalog)
    writer.add(items(0, 4))
    last = catalog.last_seq()
    assert catalog.prune_changes(last) == 4
    assert catalog.last_seq() == catalog.pruned_seq() == last  # not 0: seqs go on from it
    assert catalog.changes_since(last) == []
    newcomer = shared_store(tmp_path / "newcomer", catalog)
    writer.add(items(4, 1))
    assert newcomer.catch_up() == 1 and index_ids(newcomer) == catalog_ids(catalog)
    assert newcomer.rebuilt_behind_horizon == writer.rebuilt_behind_horizon == 0


def test_pruning_the_log_records_how_far_the_replica_applied_it_first(tmp_path: Path) -> None:
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    replica = shared_store(tmp_path / "replica", catalog)
    replica.add(items(0, 3))
    assert replica.prune_change_log() == 3  # SQLite's prune keeps no retention of its own
    assert catalog.recorded[-1] == (replica.replica_id, 3)
    alone = store(tmp_path / "alone")  # its own catalog: pruned as snapshots are written
    alone.add(items(0, 3))
    assert alone.prune_change_log() == 0 and len(alone.catalog.changes_since(0)) == 3


def test_a_replica_id_is_made_once_per_data_dir_and_kept_there(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = replica_id(tmp_path / "a")
    assert replica_id(tmp_path / "a") == first != replica_id(tmp_path / "b")
    assert stat.S_IMODE((tmp_path / "a" / "replica-id").stat().st_mode) == 0o600


def deep(levels: int) -> dict[str, object]:
    """An object ``levels`` levels deep, itself included: lists and objects alternate in it."""
    inner: object = 1
    for i in range(levels - 1):
        inner = [inner] if i % 2 == 0 else {"in": inner}
    return {"in": inner}


def test_metadata_deeper_than_the_limit_is_refused_from_any_source_lists_counting() -> None:
    assert MAX_METADATA_DEPTH == 32
    assert check_metadata(deep(32)) == deep(32)
    assert check_metadata(json.dumps(deep(32))) == deep(32)  # as text, as a CSV column holds it
    for too_deep in (deep(33), json.dumps(deep(33)), deep(50_000)):  # never recursed into
        with pytest.raises(InvalidInput, match="nested more than 32 levels deep"):
            check_metadata(too_deep)
