"""Each index kind against exact flat search: build time, search time per query (alone and
in a batch of 32), recall@10. Vectors are clustered unit vectors of the model's dimension,
as image embeddings are (many kinds of things, each a tight group)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.storage.index import IndexParams, VectorIndex
from bench.harness.fill import clustered


@dataclass
class KindResult:
    kind: str
    build_s: float
    ms_per_query_alone: float
    ms_per_query_batch32: float
    recall_at_10: float


def measure(
    n: int, dim: int, queries: int = 256, kinds: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")
) -> list[KindResult]:
    base = clustered(n, dim, clusters=max(10, n // 1000), seed=0)
    q = clustered(queries, dim, clusters=max(10, n // 1000), seed=0)[::-1].copy()
    q = q + 0.0  # same cluster centres (same seed), other members
    ids = np.arange(n, dtype=np.int64)
    results: list[KindResult] = []
    truth: npt.NDArray[np.int64] | None = None
    for kind in kinds:
        index = VectorIndex(dim, IndexParams(kind=kind))
        started = time.perf_counter()
        index.rebuild(ids, base)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(32):
            index.search(q[i : i + 1], 10)
        alone = (time.perf_counter() - started) / 32 * 1000
        started = time.perf_counter()
        found = np.concatenate([index.search(q[i : i + 32], 10)[1] for i in range(0, queries, 32)])
        batched = (time.perf_counter() - started) / queries * 1000
        if truth is None:
            truth = found
        recall = float(
            np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
        )
        results.append(KindResult(kind, build_s, alone, batched, recall))
        del index
    return results


def measure_table(items: int, dim: int = 1280) -> dict[str, Any]:
    """Every kind on ``items`` vectors of ``dim``, rounded as RESULTS.md shows them."""
    rows = [
        {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(r).items()}
        for r in measure(items, dim)
    ]
    return {"items": items, "dim": dim, "rows": rows}
