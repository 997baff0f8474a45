"""Crop views in the index: an item is found by its best view, each item once, and it is
added, removed and filtered as one item."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from batchserve.models.views import VIEW_WEIGHT, crop_boxes
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore, SearchQuery
from batchserve.storage.viewed_index import VIEW_SLOTS, ViewedIndex, best_per_item, view_ids

DIM, VIEWS = 16, 5


def units(rng: np.random.Generator, *shape: int) -> npt.NDArray[np.float32]:
    x = rng.normal(size=(*shape, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_crop_boxes_are_the_centre_then_the_four_corners_at_the_fraction() -> None:
    boxes = crop_boxes(100, 50, 0.7)
    assert boxes == [
        (15, 7, 85, 42),
        (0, 0, 70, 35),
        (30, 0, 100, 35),
        (0, 15, 70, 50),
        (30, 15, 100, 50),
    ]


def test_view_ids_keep_each_items_views_together_with_the_whole_image_first() -> None:
    ids = view_ids(np.array([3, 10]), 2)
    assert ids.tolist() == [24, 25, 26, 80, 81, 82]
    assert (ids // VIEW_SLOTS).tolist() == [3, 3, 3, 10, 10, 10]


def test_best_per_item_keeps_each_items_first_hit_in_order() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)
    ids = np.array([[VIEW_SLOTS * 4 + 2, VIEW_SLOTS * 4, VIEW_SLOTS * 7 + 1, -1, -1]])
    found_scores, found = best_per_item(scores, ids, 3)
    assert found.tolist() == [[4, 7, -1]]
    assert found_scores[0, :2].tolist() == pytest.approx([0.9, 0.7])


def oracle(
    items: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Each item's best view by brute force (a crop's cosine weighed), the top ``k`` items of
    each query."""
    scores = np.einsum("qd,nvd->qnv", queries, items)
    best = np.maximum(scores[:, :, 0], VIEW_WEIGHT * scores[:, :, 1:].max(axis=2))
    top = np.argsort(-best, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best, top, axis=1), top


def test_search_ranks_items_by_their_best_view_as_brute_force_does() -> None:
    rng = np.random.default_rng(1)
    items, queries = units(rng, 300, 1 + VIEWS), units(rng, 20)
    index = ViewedIndex(VectorIndex(DIM, IndexParams(kind="flat")), VIEWS)
    index.add(np.arange(300), items)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = oracle(items, queries, 10)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    assert index.size == 300


def test_a_query_equal_to_a_crop_view_finds_its_item_first_at_the_views_weight() -> None:
    rng = np.random.default_rng(2)
    items = units(rng, 50, 1 + VIEWS)
    index = ViewedIndex(VectorIndex(DIM, IndexParams()), VIEWS)
    index.add(np.arange(50), items)
    scores, ids = index.search(items[17, 3][None], 1)
    assert ids[0, 0] == 17 and scores[0, 0] == pytest.approx(VIEW_WEIGHT)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_a_removed_item_loses_every_view(kind: str) -> None:
    rng = np.random.default_rng(3)
    items = units(rng, 40, 1 + VIEWS)
    index = ViewedIndex(VectorIndex(DIM, IndexParams(kind=kind, train_min=100, nprobe=64)), VIEWS)
    index.rebuild(np.arange(40), items)  # 240 rows: ivf is trained
    assert index.kind_in_use == kind
    index.remove(np.array([5]))
    assert index.size == 39
    for view in range(1 + VIEWS):
        _scores, ids = index.search(items[5, view][None], 40)
        found = [i for i in ids[0].tolist() if i >= 0]
        assert 5 not in found and len(set(found)) == 39


def test_a_filtered_search_sees_only_the_allowed_items_by_their_best_view() -> None:
    rng = np.random.default_rng(4)
    items, queries = units(rng, 60, 1 + VIEWS), units(rng, 5)
    index = ViewedIndex(VectorIndex(DIM, IndexParams()), VIEWS)
    index.add(np.arange(60), items)
    allowed = np.array([2, 9, 31, 44])
    scores, ids = index.search(queries, 3, allowed)
    want_scores, want = oracle(items[allowed], queries, 3)
    assert ids.tolist() == allowed[want].tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_item_vectors_of_the_wrong_shape_are_refused() -> None:
    index = ViewedIndex(VectorIndex(DIM, IndexParams()), VIEWS)
    with pytest.raises(ValueError, match=r"\[N, 6, 16\]"):
        index.add(np.arange(2), np.zeros((2, DIM), dtype=np.float32))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_store_of_views_reopens_from_its_snapshot_with_its_removals(
    tmp_path: Path, kind: str
) -> None:
    rng = np.random.default_rng(5)
    vectors = units(rng, 30, 1 + VIEWS)

    def store() -> ItemStore:
        index = ViewedIndex(VectorIndex(DIM, IndexParams(kind=kind)), VIEWS)
        return ItemStore(tmp_path, index, {"name": "m", "dim": DIM}, views=VIEWS)

    first = store()
    first.open()
    first.add([NewItem(f"i{n}", v[0], views=v[1:]) for n, v in enumerate(vectors)])
    first.delete("i7")
    first.snapshot()
    first.close()
    again = store()
    report = again.open()
    assert not report.rebuilt and report.snapshot_seq > 0 and not report.skipped_snapshots
    assert again.index.size == 29
    (found,) = again.search([SearchQuery(vectors[7, 2], 30)])
    assert "i7" not in [m.id for m in found] and len(found) == 29
    (found,) = again.search([SearchQuery(vectors[3, 4], 1)])
    assert found[0].id == "i3" and found[0].score == pytest.approx(VIEW_WEIGHT)


def test_a_snapshot_of_views_weighed_otherwise_is_not_used(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    vectors = units(rng, 4, 1 + VIEWS)
    index = ViewedIndex(VectorIndex(DIM, IndexParams()), VIEWS)
    first = ItemStore(tmp_path, index, {"name": "m", "dim": DIM}, views=VIEWS)
    first.open()
    first.add([NewItem(f"i{n}", v[0], views=v[1:]) for n, v in enumerate(vectors)])
    path = first.snapshot()
    first.close()
    assert path is not None
    meta = path.with_suffix(".json")
    meta.write_text(meta.read_text().replace('"view_weight": 0.95', '"view_weight": 0.9'))
    again = ItemStore(
        tmp_path,
        ViewedIndex(VectorIndex(DIM, IndexParams()), VIEWS),
        {"name": "m", "dim": DIM},
        views=VIEWS,
    )
    report = again.open()
    assert report.rebuilt and "item views weighed 0.9" in report.skipped_snapshots[0]
    assert again.index.size == 4


def test_the_rows_fetched_hold_every_top_item_and_stay_within_a_gpu_search() -> None:
    from batchserve.storage.viewed_index import GPU_MAX_ROWS, rows_to_fetch

    assert rows_to_fetch(10, 5, "cpu") == 60 and rows_to_fetch(1000, 5, "cpu") == 6000
    assert rows_to_fetch(10, 5, "gpu") == 60 and rows_to_fetch(1000, 5, "gpu") == GPU_MAX_ROWS
    assert rows_to_fetch(3000, 5, "gpu") == 3000  # never fewer rows than items asked for
