"""Writes to a shared PostgreSQL catalog from one replica and from two at once: does the
change log's global lock cap a cluster's adds?

Every write transaction takes one advisory lock (``LOG_LOCK``) from appending its changes
to its commit, so that the log's order is commit order (storage/postgres.py). Here a
throwaway PostgreSQL (tests/postgres.py's cluster) takes upserts from 1 and then 2 writer
processes, each a replica's ``PostgresCatalog``, in batches of 32 items (an add of 32
images) and of 1; each item the built-in model's 1280 floats and a 12 KB thumbnail. Then
the same two writers with each its own log lock (unsafe: for measurement only): if the
lock were the cap, two writers would gain from that what the lock takes. Rounds alternate;
each ratio is taken within its round, the median quoted.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any

import numpy as np

from bench.harness.fill import BUILTIN_FINGERPRINT

THUMBNAIL_BYTES = 12 * 1024


def _items(writer: int, first: int, count: int, rng: np.random.Generator) -> list[Any]:
    from batchserve.storage.records import NewItem

    vectors = rng.standard_normal((count, 1280)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    thumbnail = rng.integers(0, 256, THUMBNAIL_BYTES, dtype=np.uint8).tobytes()
    return [
        NewItem(f"w{writer}/{first + i}", vectors[i], "bench", {"n": first + i}, None, thumbnail)
        for i in range(count)
    ]


def _write(job: tuple[str, int, int, float, float, bool]) -> int:
    """One writer process: upserts of ``batch`` items from ``start_at`` for ``seconds``;
    the items written. ``own_lock``: this writer orders its log with a lock of its own."""
    url, writer, batch, start_at, seconds, own_lock = job
    from batchserve.storage import postgres, postgres_schema

    if own_lock:
        postgres.LOG_LOCK = (postgres_schema.LOCK_CLASS, 1000 + writer)  # type: ignore[attr-defined]
    catalog = postgres.PostgresCatalog(url, 1280)
    catalog.check_model(BUILTIN_FINGERPRINT)
    rng = np.random.default_rng(writer)
    pending = [_items(writer, n * batch, batch, rng) for n in range(64)]
    time.sleep(max(0.0, start_at - time.time()))
    written = n = 0
    deadline = start_at + seconds
    while time.time() < deadline:
        catalog.upsert(pending[n % len(pending)])
        written += batch
        n += 1
    catalog.close()
    return written


def rate(url: str, writers: int, batch: int, seconds: float, own_lock: bool = False) -> float:
    """Items per second that ``writers`` processes upsert together."""
    start_at = time.time() + 3.0  # each process imports and connects first
    jobs = [(url, w, batch, start_at, seconds, own_lock) for w in range(writers)]
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        written = pool.map(_write, jobs)
    return sum(written) / seconds


def _median_ratio(tops: list[float], bottoms: list[float]) -> float:
    return round(statistics.median(t / b for t, b in zip(tops, bottoms, strict=True)), 2)


def measure(seconds: float = 5.0, rounds: int = 3) -> dict[str, Any]:
    from tests.postgres import postgres_cluster

    figures: dict[str, Any] = {
        "seconds": seconds,
        "rounds": rounds,
        "thumbnail_bytes": THUMBNAIL_BYTES,
    }
    with postgres_cluster() as cluster:
        url = cluster.create_database()
        for batch in (32, 1):
            one, two, unlocked = [], [], []
            for _ in range(rounds):
                one.append(rate(url, 1, batch, seconds))
                two.append(rate(url, 2, batch, seconds))
                unlocked.append(rate(url, 2, batch, seconds, own_lock=True))
            figures[f"batch_{batch}"] = {
                "one_writer_per_s": round(statistics.median(one)),
                "two_writers_per_s": round(statistics.median(two)),
                "two_writers_own_locks_per_s": round(statistics.median(unlocked)),
                "two_over_one": _median_ratio(two, one),
                "own_locks_over_shared": _median_ratio(unlocked, two),
            }
    return figures
