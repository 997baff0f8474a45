"""How long a new replica takes to be ready on a shared PostgreSQL catalog of N items: a
throwaway PostgreSQL (tests/postgres.py's cluster), N items of the built-in model's size
(1280 floats) written through the catalog in batches, then a replica's index opened from
the catalog alone (a new replica: every vector read from PostgreSQL), then from its own
snapshot plus the changes made since. The model's load (~12 s here) comes on top and is
not counted: it is the same with any catalog."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore
from bench.harness.fill import BUILTIN_FINGERPRINT, LABELS, clustered

BATCH = 1000
LATER_CHANGES = 1000


def _write(url: str, vectors: Any, start: int, stop: int) -> float:
    """Items ``start``..``stop`` written through a catalog in batches; the seconds taken."""
    from batchserve.storage.postgres import PostgresCatalog

    catalog = PostgresCatalog(url, 1280)
    catalog.check_model(BUILTIN_FINGERPRINT)
    started = time.perf_counter()
    for first in range(start, stop, BATCH):
        catalog.upsert(
            [
                NewItem(f"synthetic/{i}", vectors[i], LABELS[i % len(LABELS)], {"n": i})
                for i in range(first, min(stop, first + BATCH))
            ]
        )
    seconds = time.perf_counter() - started
    catalog.close()
    return seconds


def _open(url: str, data_dir: Path) -> tuple[ItemStore, float, Any]:
    from batchserve.storage.postgres import PostgresCatalog

    started = time.perf_counter()
    store = ItemStore(
        data_dir, VectorIndex(1280, IndexParams()), BUILTIN_FINGERPRINT, PostgresCatalog(url, 1280)
    )
    report = store.open()
    return store, time.perf_counter() - started, report


def measure(items: int) -> dict[str, Any]:
    from tests.postgres import postgres_cluster

    vectors = clustered(items + LATER_CHANGES, 1280, clusters=max(10, items // 1000), seed=1)
    data_dir = Path(tempfile.mkdtemp(prefix="batchserve-bench-replica-"))
    try:
        with postgres_cluster() as cluster:
            url = cluster.create_database()
            write_s = _write(url, vectors, 0, items)
            store, cold_s, _ = _open(url, data_dir)
            assert store.index.size == items
            store.snapshot()
            store.close()
            _write(url, vectors, items, items + LATER_CHANGES)
            again, warm_s, report = _open(url, data_dir)
            assert again.index.size == items + LATER_CHANGES and report.replayed == LATER_CHANGES
            again.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "items": items,
        "write_s": round(write_s, 1),
        "writes_per_s": round(items / write_s),
        "new_replica_s": round(cold_s, 1),
        "later_changes": LATER_CHANGES,
        "restart_s": round(warm_s, 2),
    }
