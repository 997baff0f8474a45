"""The FAISS index against exact numpy oracles: flat equals brute force, the approximate
kinds reach recall@10 >= 0.95 at their default parameters on clustered data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from batchserve.storage.index import (
    IndexParams,
    VectorIndex,
    auto_nlist,
    auto_pq_m,
    gpu_available,
    search_threads,
)


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


def brute_force_scores(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.sort(queries @ base.T, axis=1)[:, ::-1][:, :k]


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


@pytest.mark.parametrize(
    ("kind", "n", "allowed"),
    [("flat", 600, None), ("hnsw", 600, None), ("ivf", 600, None), ("ivf", 24_000, 20_001)],
)
def test_the_search_count_is_of_calls_into_faiss_one_per_batch_of_queries(
    kind: str, n: int, allowed: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted as FAISS is called: searching a batch query by query would count (and here
    be seen entering FAISS) once per query. An allowed set past 20,000 ids is searched by
    FAISS with a selector, not as an exact product."""
    entered: list[int] = []
    for faiss_class in (faiss.IndexIDMap2, faiss.IndexIVFFlat):
        real = faiss_class.search

        def search(self: Any, x: np.ndarray, *args: Any, real: Any = real, **kw: Any) -> Any:
            entered.append(len(x))
            return real(self, x, *args, **kw)

        monkeypatch.setattr(faiss_class, "search", search)
    base = clustered(n, 8, seed=4)
    ids = np.arange(n, dtype=np.int64)
    index = VectorIndex(8, IndexParams(kind=kind, train_min=500, nlist=16))
    index.rebuild(ids, base)
    assert index.kind_in_use == kind
    subset = None if allowed is None else ids[:allowed]
    _scores, found = index.search(base[:7], 3, subset)
    assert entered == [7] and index.calls["search"] == 1
    assert found.shape == (7, 3)


def test_adds_and_removes_are_one_call_each_whatever_their_size() -> None:
    index = VectorIndex(16, IndexParams(kind="flat"))
    index.add(np.arange(50, dtype=np.int64), clustered(50, 16))
    index.remove(np.arange(10, dtype=np.int64))
    assert (index.calls["add"], index.calls["remove"], index.size) == (1, 1, 40)


@pytest.mark.parametrize(
    ("n", "nlist"),
    [
        (100, 16),  # n / 39 = 2, but never fewer than 16 lists
        (10_000, 256),  # n / 39 = 256 is below 4 sqrt(n) = 400
        (1_000_000, 4000),  # 4 sqrt(n) = 4000 is below n / 39 = 25641
        (10**9, 65536),  # both past the cap
    ],
)
def test_auto_nlist_is_about_4_sqrt_n_within_16_and_n_over_39(n: int, nlist: int) -> None:
    assert auto_nlist(n) == nlist


@pytest.mark.parametrize(
    ("dim", "m"),
    [(4, 1), (128, 32), (1280, 320), (30, 6), (3, 1)],  # 30 / 4 = 7 does not divide 30
)
def test_auto_pq_m_is_the_largest_divisor_of_dim_up_to_a_quarter_of_it(dim: int, m: int) -> None:
    assert auto_pq_m(dim) == m


def test_a_flat_index_never_needs_training() -> None:
    index = VectorIndex(8, IndexParams(kind="flat", train_min=10))
    index.add(np.arange(20), clustered(20, 8))
    assert index.trained and not index.needs_training()


def test_ivf_scores_are_the_cosine_similarities_of_a_flat_oracle() -> None:
    base, queries = clustered(600, 16), clustered(5, 16, seed=4)
    ids = np.arange(600, dtype=np.int64) * 3 + 1
    index = VectorIndex(16, IndexParams(kind="ivf", train_min=500, nlist=8, nprobe=8))
    index.rebuild(ids, base)  # nprobe = nlist: every list is searched, so results are exact
    assert index.kind_in_use == "ivf"
    scores, found = index.search(queries, 5)
    np.testing.assert_array_equal(found, brute_force(base, ids, queries, 5))
    np.testing.assert_allclose(scores, brute_force_scores(base, queries, 5), atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "params"),
    [("hnsw", {"ef_search": 16}), ("ivfpq", {"nprobe": 1})],  # too narrow to find them all
)
def test_a_small_filter_on_an_approximate_kind_is_searched_exactly(
    kind: str, params: dict[str, Any]
) -> None:
    base, queries = clustered(600, 16), clustered(4, 16, seed=5)
    ids = np.arange(600, dtype=np.int64) * 5 + 7
    index = VectorIndex(16, IndexParams(kind=kind, train_min=500, nlist=8, **params))
    index.rebuild(ids, base)
    assert index.kind_in_use == kind
    allowed = ids[::50]
    mask = np.isin(ids, allowed)
    scores, found = index.search(queries, len(allowed), allowed)
    expected = brute_force_scores(base[mask], queries, len(allowed))
    if kind == "hnsw":  # stores the vectors as they are
        np.testing.assert_array_equal(found, brute_force(base[mask], ids[mask], queries, 12))
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    else:  # ivfpq keeps 8-bit vectors: every allowed id, scored within quantisation error
        assert all(set(row) == set(allowed.tolist()) for row in found.tolist())
        np.testing.assert_allclose(scores, expected, atol=0.02)


def _large_filter_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    base = unit(rng.normal(size=(21_000, 4)))
    ids = np.arange(21_000, dtype=np.int64) * 3 + 1000
    refused = np.arange(21_000) % 50 == 0  # 420 refused, 20,580 allowed
    return base, ids, refused


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("ivf", {"nlist": 8, "nprobe": 8}),
        ("hnsw", {"hnsw_m": 4, "ef_construction": 16}),
        ("ivfpq", {"nlist": 8, "nprobe": 8, "pq_m": 2}),
    ],
)
def test_a_filter_of_more_than_20000_ids_returns_only_allowed_ids(
    kind: str, params: dict[str, Any]
) -> None:
    base, ids, refused = _large_filter_data()
    index = VectorIndex(4, IndexParams(kind=kind, train_min=1000, **params))
    index.rebuild(ids, base)
    assert index.kind_in_use == kind
    queries = base[refused][:20]  # each query's own vector is refused
    allowed = ids[~refused]
    assert len(allowed) > 20_000
    scores, found = index.search(queries, 5, allowed)
    assert np.isin(found, allowed).all()
    best = brute_force_scores(base[~refused], queries, 5)
    if kind == "ivf":  # every list probed: exact
        np.testing.assert_array_equal(found, brute_force(base[~refused], allowed, queries, 5))
        np.testing.assert_allclose(scores, best, atol=1e-5)
    else:  # approximate: scores true to the ids found and near the best, within 8-bit error
        true_scores = np.einsum("qd,qkd->qk", queries, base[(found - 1000) // 3])
        np.testing.assert_allclose(scores, true_scores, atol=0.02)
        np.testing.assert_allclose(scores, best, atol=0.02)


def test_a_filter_of_fewer_ids_than_k_returns_them_with_their_true_scores() -> None:
    base, queries = clustered(100, 16), clustered(2, 16, seed=6)
    ids = np.arange(100, dtype=np.int64)
    index = VectorIndex(16, IndexParams(kind="flat"))
    index.add(ids, base)
    allowed = np.array([5, 50, 95], dtype=np.int64)
    scores, found = index.search(queries, 10, allowed)
    assert scores.shape == found.shape == (2, 10)
    np.testing.assert_array_equal(found[:, :3], brute_force(base[allowed], allowed, queries, 3))
    np.testing.assert_allclose(scores[:, :3], brute_force_scores(base[allowed], queries, 3))
    assert (found[:, 3:] == -1).all() and (scores[:, 3:] == -np.inf).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_after_removing_the_top_hits_a_search_still_returns_k_live_results(kind: str) -> None:
    base, queries = clustered(600, 16), clustered(5, 16, seed=7)
    ids = np.arange(600, dtype=np.int64) + 100
    index = VectorIndex(16, IndexParams(kind=kind, train_min=500, nlist=8))
    index.rebuild(ids, base)
    removed = np.unique(brute_force(base, ids, queries, 5))
    index.remove(removed)
    live = ~np.isin(ids, removed)
    scores, found = index.search(queries, 5)
    assert found.dtype == np.int64 and np.isin(found, ids[live]).all()
    assert np.isfinite(scores).all()
    if kind == "hnsw":
        np.testing.assert_array_equal(found, brute_force(base[live], ids[live], queries, 5))
    np.testing.assert_allclose(scores, brute_force_scores(base[live], queries, 5), atol=0.02)


@pytest.mark.skipif(gpu_available(), reason="FAISS here has GPU support and sees a GPU")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_without_a_gpu_the_index_runs_on_the_cpu(device: str) -> None:
    assert VectorIndex(8, IndexParams(device=device)).device == "cpu"


@pytest.mark.skipif(gpu_available(), reason="FAISS here has GPU support and sees a GPU")
def test_asking_for_a_gpu_without_one_is_refused() -> None:
    with pytest.raises(RuntimeError, match="index_device=gpu"):
        VectorIndex(8, IndexParams(device="gpu"))
