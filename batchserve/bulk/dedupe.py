"""``batchserve dedupe``: the groups of copies in a catalog, the job users of
near-duplicate detection run on what they have stored.

Every item's embedding (the whole image's) is searched among all the others: its top
``verify_k`` are its candidates. Each pair of candidates is verified once by the items'
stored local features (models/verification.py), on threads (OpenCV releases the GIL); the
verified pairs join their items into groups (union-find), so a copy of a copy lands in
the original's group. Items without local features are counted and left out. Reads the
catalog only: a server may go on serving from it.

Memory: every embedding (4 bytes a dimension) and every item's local features (about
7 KB) are held at once: about 12 KB an item with the built-in model.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.errors import ConfigError
from batchserve.models import verification
from batchserve.models.keypoints import LocalFeatures, unpacked
from batchserve.models.verification import VerifyPolicy
from batchserve.settings import setting
from batchserve.storage import hamming
from batchserve.storage.catalog import Catalog
from batchserve.storage.data_dir import StoreSettings, open_as_made
from batchserve.storage.index import IndexParams, VectorIndex

#: Queries searched in one index call.
_SEARCH_CHUNK = 1024


@dataclass(frozen=True)
class DedupeSettings:
    """Where the groups go, and how many threads verify."""

    output: str = setting(
        "", "write the groups to this file, .csv (group,id,label) or .json ('': CSV on stdout)"
    )
    dedupe_threads: int = setting(0, "threads that verify pairs (0: one per core)", at_least=0)

    def __post_init__(self) -> None:
        if self.output and not self.output.endswith((".csv", ".json")):
            raise ConfigError(f"output must be a .csv or .json file, got {self.output!r}")


@dataclass(frozen=True)
class Pair:
    """Two items verified as copies of each other, and the evidence."""

    a: str
    b: str
    score: float
    inliers: int


@dataclass
class DedupeReport:
    """What a run found: the groups of copies (ids, each group sorted), the pairs that
    made them, and what it looked at."""

    items: int = 0
    without_features: int = 0
    pairs_verified: int = 0
    groups: list[list[str]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    labels: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "without_features": self.without_features,
            "pairs_verified": self.pairs_verified,
            "copies_found": len(self.pairs),
            "groups": self.groups,
            "pairs": [vars(p) for p in self.pairs],
            "seconds": round(self.seconds, 1),
        }

    def as_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["group", "id", "label"])
        for number, group in enumerate(self.groups, 1):
            writer.writerows([number, item_id, self.labels.get(item_id) or ""] for item_id in group)
        return out.getvalue()


def dedupe(store: StoreSettings, policy: VerifyPolicy, settings: DedupeSettings) -> DedupeReport:
    """The groups of copies among the items of ``store``'s catalog."""
    started = time.perf_counter()
    catalog = open_as_made(store)
    try:
        fids, vectors = _whole_images(catalog)
        items = catalog.items_by_fid(fids.tolist())
        stored = catalog.local_features(fids.tolist())
    finally:
        catalog.close()
    report = DedupeReport(items=len(fids))
    report.labels = {item.id: item.label for item in items.values()}
    features = {fid: unpacked(stored.get(fid)) for fid in fids.tolist()}
    report.without_features = sum(found is None for found in features.values())
    pairs = _candidate_pairs(fids, vectors, policy.verify_k, features)
    report.pairs_verified = len(pairs)
    threads = settings.dedupe_threads or os.cpu_count() or 1
    with ThreadPoolExecutor(threads, thread_name_prefix="batchserve-dedupe") as pool:
        verdicts = pool.map(
            lambda pair: _verify_pair(features, pair, policy.copy_min_inliers), pairs
        )
        for (a, b, score), inliers in zip(pairs, verdicts, strict=True):
            if inliers is not None:
                report.pairs.append(Pair(items[a].id, items[b].id, round(score, 4), inliers))
    report.groups = _groups(report.pairs)
    report.seconds = time.perf_counter() - started
    return report


def _whole_images(catalog: Catalog) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Every row's fid and embedding of the whole image (not its item views)."""
    fids, vectors = [], []
    for chunk_fids, chunk in catalog.vectors():
        fids.append(chunk_fids)
        vectors.append(chunk[:, 0] if chunk.ndim == 3 else chunk)
    if not fids:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(fids), np.ascontiguousarray(np.concatenate(vectors))


def _candidate_pairs(
    fids: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.float32],
    k: int,
    features: dict[int, LocalFeatures | None],
) -> list[tuple[int, int, float]]:
    """(fid, fid, score) of each pair where one is among the other's top ``k``, once,
    both with local features."""
    if len(fids) < 2:
        return []
    index = VectorIndex(vectors.shape[1], IndexParams())
    index.add(fids, vectors)
    seen: dict[tuple[int, int], float] = {}
    for start, scores, found in _searched(index, vectors, k + 1):
        for row, (row_scores, row_ids) in enumerate(zip(scores, found, strict=True)):
            own = int(fids[start + row])
            if features[own] is None:
                continue
            for score, other in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
                if other < 0 or other == own or features.get(other) is None:
                    continue
                seen.setdefault((min(own, other), max(own, other)), score)
    return [(a, b, score) for (a, b), score in seen.items()]


def _searched(
    index: VectorIndex, vectors: npt.NDArray[np.float32], k: int
) -> Iterator[tuple[int, npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
    for start in range(0, len(vectors), _SEARCH_CHUNK):
        scores, found = index.search(vectors[start : start + _SEARCH_CHUNK], k)
        yield start, scores, found


def _verify_pair(
    features: dict[int, LocalFeatures | None], pair: tuple[int, int, float], min_inliers: int
) -> int | None:
    """The inliers of a verified pair; None when it is not a copy."""
    a, b = features[pair[0]], features[pair[1]]
    assert a is not None and b is not None  # pairs are made of items with features
    verdict = verification.verify(a, b, min_inliers, hamming.two_nearest)
    return verdict.inliers if verdict.verified else None


def _groups(pairs: Sequence[Pair]) -> list[list[str]]:
    """The connected groups of ``pairs``' items, each sorted, the largest first."""
    parent: dict[str, str] = {}

    def root(item: str) -> str:
        while parent.setdefault(item, item) != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for pair in pairs:
        parent[root(pair.a)] = root(pair.b)
    members: dict[str, list[str]] = {}
    for item in parent:
        members.setdefault(root(item), []).append(item)
    return sorted((sorted(group) for group in members.values()), key=lambda g: (-len(g), g))


def write(report: DedupeReport, output: str) -> str:
    """Write the groups to ``output`` (.csv or .json); the CSV when ``output`` is empty."""
    if output.endswith(".json"):
        text = json.dumps(report.as_json(), indent=2) + "\n"
    else:
        text = report.as_csv()
    if output:
        Path(output).write_text(text)
        return ""
    return text
