"""The content digests the catalog keeps of indexed files (the ``sources`` table), which let
a re-run of ``batchserve index`` skip unchanged files. Real SQLite in a temporary
directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore

DIM = 4
MODEL = {"name": "m", "weights_sha256": "abc", "dim": DIM}
A, B = "a" * 64, "b" * 64


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def store(path: Path) -> ItemStore:
    s = ItemStore(path, VectorIndex(DIM, IndexParams()), dict(MODEL))
    s.open()
    return s


def source_rows(path: Path) -> list[tuple[str, str]]:
    """(item id, sha256) of every row of the sources table."""
    with sqlite3.connect(path / "catalog.sqlite3") as db:
        rows = db.execute(
            "SELECT items.id, sources.sha256 FROM sources LEFT JOIN items USING (fid) "
            "ORDER BY items.id"
        )
        return [(str(r[0]), str(r[1])) for r in rows]


def test_digests_gives_each_present_ids_digest_or_none_and_leaves_out_absent_ids(
    tmp_path: Path,
) -> None:
    s = store(tmp_path)
    s.add([NewItem("file", vec(1), digest=A), NewItem("api", vec(2))])
    assert s.catalog.digests(["file", "api", "absent"]) == {"file": A, "api": None}
    assert s.catalog.digests([]) == {}
    assert s.catalog.ids(["file", "api", "absent"]) == {"file", "api"}


def test_replacing_an_item_replaces_its_digest(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem("x", vec(1), digest=A)])
    s.add([NewItem("x", vec(2), digest=B)])  # the file changed and was indexed again
    assert s.catalog.digests(["x"]) == {"x": B}
    assert source_rows(tmp_path) == [("x", B)]
    s.add([NewItem("x", vec(3))])  # then replaced through the API: no file to compare
    assert s.catalog.digests(["x"]) == {"x": None}
    assert source_rows(tmp_path) == []


def test_deleting_an_item_removes_its_digest(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem("x", vec(1), digest=A), NewItem("y", vec(2), digest=B)])
    assert s.delete("x")
    assert s.catalog.digests(["x", "y"]) == {"y": B}
    assert source_rows(tmp_path) == [("y", B)]


def test_digests_survive_a_restart(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem("x", vec(1), digest=A)])
    s.close()
    assert store(tmp_path).catalog.digests(["x"]) == {"x": A}


def test_digests_of_more_ids_than_one_query_holds(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem(f"id{i}", vec(i), digest=f"{i:064x}") for i in range(1200)])
    wanted = [f"id{i}" for i in range(0, 1300, 3)]  # past 500 ids a query; some absent
    assert s.catalog.digests(wanted) == {f"id{i}": f"{i:064x}" for i in range(0, 1200, 3)}


def test_a_catalog_from_before_digests_opens_and_its_items_have_none(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.add([NewItem("old", vec(1))])
    s.close()
    with sqlite3.connect(tmp_path / "catalog.sqlite3") as db:
        db.execute("DROP TABLE sources")  # as a catalog written before them
    again = store(tmp_path)
    assert again.catalog.digests(["old"]) == {"old": None}
    again.add([NewItem("new", vec(2), digest=A)])
    assert again.catalog.digests(["old", "new"]) == {"old": None, "new": A}
