"""POST /v1/search on a large index (section 6 of RESULTS.md): the flat and HNSW indexes
under the same points, what search adds to a request, and how the index opens at a
restart (from a snapshot, rebuilt from the catalog, an HNSW index built at start)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.store import ItemStore
from bench.harness import fill, load, point, procs
from bench.harness.bodies import build_requests
from bench.scenarios.embed import Plan, points

ROUTE = "/v1/search?k=10"
DIM = 1280  # the built-in model's embeddings, as bench/harness/fill.py stores them


def open_index(data_dir: Path, kind: str, keep_snapshot: bool = False) -> dict[str, Any]:
    """Open the data dir's index as the server does at start (``ItemStore.open``, default
    index parameters for ``kind``, as the server's) and report how and how fast. With
    ``keep_snapshot`` a snapshot of the opened index is written, so that a server started
    next opens it from there."""
    index = VectorIndex(DIM, IndexParams(kind=kind))
    store = ItemStore(data_dir, index, fill.BUILTIN_FINGERPRINT)
    try:
        report = store.open()
        described = store.describe()
        if keep_snapshot:
            store.snapshot()
    finally:
        store.close()
    return {
        "seconds": round(report.seconds, 2),
        "size": described.size,
        "kind": described.kind_in_use,
        "rebuilt": report.rebuilt,
        "snapshot_seq": report.snapshot_seq,
        "replayed": report.replayed,
    }


def search_adds(url: str, images: list[bytes], slo_ms: float, rounds: int = 3) -> dict[str, float]:
    """p50 of /v1/search minus p50 of /v1/embed at one client, alternated so that drift
    of the machine's speed hits both alike."""
    embed: list[float] = []
    search: list[float] = []
    stage: list[float] = []
    for _ in range(rounds):
        for route, out in (("/v1/embed", embed), (ROUTE, search)):
            requests = build_requests(url, route, images)
            spec = load.LoadSpec(url + route, requests, duration_s=5.0, warmup_s=1.0, concurrency=1)
            measured = point.measure(url, spec, 1, slo_ms)
            out.append(measured["p50_ms"])
            if route == ROUTE:
                stage.append(measured.get("server", {}).get("mean_search_ms", 0.0))
    return {
        "embed_p50_ms": statistics.median(embed),
        "search_p50_ms": statistics.median(search),
        "adds_ms": statistics.median(search) - statistics.median(embed),
        "search_stage_ms": statistics.median(stage),
    }


def _served(directory: Path, flags: list[str], images: list[bytes], plan: Plan) -> Any:
    running = procs.ServerProcess.start(directory, ["--no-demo", *flags])
    try:
        measured = points(running.url, ROUTE, images, plan)
        adds = search_adds(running.url, images, plan.slo_ms) if flags else None
    finally:
        running.stop()
    return measured, adds, running.ready_s


def measure(items: int, images: list[bytes], plan: Plan) -> dict[str, Any]:
    """Fill a data dir with ``items`` items, then: the flat index from its snapshot (opened,
    then served), rebuilt without one, then built as HNSW (opened, then served)."""
    plan = replace(plan, rates=[5, 20, 40], clients=[1, 32])
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-search-"))
    data_dir = directory / "data"
    try:
        fill_s = fill.fill(data_dir, items)
        snapshot_open = open_index(data_dir, "flat")
        flat, _, restart_ready_s = _served(directory, [], images, plan)
        for path in (data_dir / "snapshots").glob("*"):
            path.unlink()
        rebuild_open = open_index(data_dir, "flat")
        hnsw_build = open_index(data_dir, "hnsw", keep_snapshot=True)
        hnsw, adds, _ = _served(directory, ["--index-kind", "hnsw"], images, plan)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "items": items,
        "fill_s": round(fill_s, 1),
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "flat": flat,
        "hnsw": hnsw,
        "snapshot_open": snapshot_open,
        "restart_ready_s": round(restart_ready_s, 1),
        "rebuild_open": rebuild_open,
        "hnsw_build": hnsw_build,
        "adds": adds,
    }
