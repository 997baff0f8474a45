"""The FAISS index against exact numpy oracles: flat equals brute force, the approximate
kinds reach recall@10 >= 0.95 at their default parameters on clustered data."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from batchserve.index import IndexParams, VectorIndex, search_threads


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Vectors around ``clusters`` centres, as image embeddings of many kinds are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    which = rng.integers(0, clusters, n)
    return unit(centres[which] + 0.35 * rng.normal(size=(n, dim)))


def brute_force(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ base.T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def test_flat_equals_brute_force_top_k() -> None:
    rng = np.random.default_rng(1)
    base, queries = unit(rng.normal(size=(3000, 48))), unit(rng.normal(size=(50, 48)))
    ids = rng.permutation(10**6)[:3000].astype(np.int64)  # external ids, not positions
    index = VectorIndex(48, IndexParams(kind="flat"))
    index.add(ids, base)
    scores, found = index.search(queries, 10)
    np.testing.assert_array_equal(found, brute_force(base, ids, queries, 10))
    expected = np.sort(queries @ base.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_flat_search_within_allowed_ids_equals_brute_force_on_the_subset() -> None:
    rng = np.random.default_rng(2)
    base, queries = unit(rng.normal(size=(2000, 32))), unit(rng.normal(size=(5, 32)))
    ids = np.arange(2000, dtype=np.int64) * 7
    index = VectorIndex(32, IndexParams(kind="flat"))
    index.add(ids, base)
    allowed = ids[::13]
    _scores, found = index.search(queries, 5, allowed)
    mask = np.isin(ids, allowed)
    np.testing.assert_array_equal(found, brute_force(base[mask], ids[mask], queries, 5))


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_kinds_reach_recall_at_10_of_095_against_flat(kind: str) -> None:
    base = clustered(20_000, 128)
    queries = clustered(200, 128, seed=9)
    ids = np.arange(20_000, dtype=np.int64) + 100
    exact = VectorIndex(128, IndexParams(kind="flat"))
    exact.add(ids, base)
    _s, truth = exact.search(queries, 10)
    index = VectorIndex(128, IndexParams(kind=kind))
    index.rebuild(ids, base)
    assert index.kind_in_use == kind
    _s, found = index.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.95, f"{kind} recall@10 {recall:.3f}"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_removed_ids_are_never_returned_and_size_counts_live_items(kind: str) -> None:
    base = clustered(3000, 32)
    ids = np.arange(3000, dtype=np.int64)
    index = VectorIndex(32, IndexParams(kind=kind, train_min=1000))
    index.rebuild(ids, base)
    index.remove(ids[:100])
    assert index.size == 2900
    _s, found = index.search(base[:100], 10)
    assert not np.isin(found, ids[:100]).any()
    _s, found = index.search(base[:5], 3, allowed=ids[:200])
    assert not np.isin(found, ids[:100]).any() and np.isin(found, ids[100:200]).all()


def test_ivf_searches_exactly_until_enough_vectors_to_train() -> None:
    index = VectorIndex(16, IndexParams(kind="ivf", train_min=500))
    base = clustered(400, 16)
    index.add(np.arange(400), base)
    assert index.kind_in_use == "flat" and not index.needs_training()
    index.add(np.arange(400, 600), clustered(200, 16, seed=3))
    assert index.needs_training()
    index.rebuild(np.arange(400), base)  # the store rebuilds from the catalog
    assert index.kind_in_use == "flat"  # 400 < train_min
    index.rebuild(np.arange(600), np.concatenate([base, clustered(200, 16, seed=3)]))
    assert index.kind_in_use == "ivf" and index.trained


def test_ids_are_never_reused() -> None:
    index = VectorIndex(8, IndexParams(kind="hnsw"))
    index.add([1, 2], clustered(2, 8))
    index.remove([1])
    with pytest.raises(ValueError, match="cannot be added again"):
        index.add([1], clustered(1, 8))


def test_wrong_dimension_is_refused() -> None:
    index = VectorIndex(8, IndexParams())
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        index.add([1], np.zeros((1, 9), dtype=np.float32))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_write_and_load_round_trip(tmp_path: Path, kind: str) -> None:
    base = clustered(500, 16)
    index = VectorIndex(16, IndexParams(kind=kind))
    index.add(np.arange(500), base)
    index.remove([3])
    tombstones = index.write(tmp_path / "i.faiss")
    again = VectorIndex(16, IndexParams(kind=kind))
    again.load(tmp_path / "i.faiss", tombstones, trained=True)
    assert again.size == 499
    np.testing.assert_array_equal(again.search(base[:20], 5)[1], index.search(base[:20], 5)[1])


@pytest.mark.parametrize(
    ("kind", "queries", "threads"),
    [("hnsw", 1, 1), ("ivf", 1, 1), ("ivfpq", 3, 3), ("hnsw", 32, 8), ("flat", 1, 8)],
)
def test_search_threads_follow_the_queries_except_for_flat(
    kind: str, queries: int, threads: int
) -> None:
    assert search_threads(kind, queries, available=8) == threads


def test_a_single_query_hnsw_search_runs_on_one_thread_then_restores_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = np.random.default_rng(1)
    index = VectorIndex(16, IndexParams(kind="hnsw"))
    index.add(np.arange(50), unit(data.standard_normal((50, 16))))
    before = faiss.omp_get_max_threads()
    calls: list[int] = []
    real = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (calls.append(n), real(n)))
    index.search(unit(data.standard_normal((1, 16))), 5)
    assert calls == [1, before]
    assert faiss.omp_get_max_threads() == before


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_a_search_of_many_queries_is_one_call_into_the_index(kind: str) -> None:
    base = clustered(600, 32)
    ids = np.arange(600, dtype=np.int64)
    index = VectorIndex(32, IndexParams(kind=kind, train_min=500, nlist=8))
    index.rebuild(ids, base)  # trains the ivf kind
    assert index.kind_in_use == kind
    _scores, found = index.search(base[:7], 3)
    assert index.calls["search"] == 1
    np.testing.assert_array_equal(found[:, 0], ids[:7])  # each query finds itself
    _scores, within = index.search(base[:5], 2, ids[::2])
    assert index.calls["search"] == 2
    assert set(within.ravel().tolist()) <= set(ids[::2].tolist())


def test_adds_and_removes_are_one_call_each_whatever_their_size() -> None:
    index = VectorIndex(16, IndexParams(kind="flat"))
    index.add(np.arange(50, dtype=np.int64), clustered(50, 16))
    index.remove(np.arange(10, dtype=np.int64))
    assert (index.calls["add"], index.calls["remove"], index.size) == (1, 1, 40)
