"""Verified search in the retrieval benchmark (``python -m bench retrieval``): each query's
top ``k`` by the default embedding re-ranked by geometric verification of local features
(batchserve/models/keypoints.py, verification.py), as the server verifies them (the query
matched as it is and mirrored): verified copies first, then the rest by score.

Copy detection: the copy queries and as many non-copy queries (generated scenes that are
not in the catalog), each answered by its first match with a confidence (a verified match:
1 + its inliers; otherwise its cosine score). Micro average precision (µAP: every answer of
every query in one list by confidence; an answer is right when it is the query's original)
and the recall at 1% false positives (the share of copy queries answered right above the
confidence that at most 1% of the non-copy queries reach)."""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from batchserve.models import keypoints, verification
from batchserve.models.images import DecodeLimits, make_query_features
from batchserve.models.keypoints import LocalFeatures
from batchserve.models.verification import Verdict
from batchserve.storage import hamming
from bench.scenarios.retrieval_data import Benchmark, Picture

#: A query's local features: found in the image, and in its mirror image.
Query = tuple[LocalFeatures, LocalFeatures]
#: The shortlists measured; the first is the one the summary quotes.
SHORTLISTS = (20, 50, 100)
#: The inlier thresholds measured (at the first shortlist).
THRESHOLDS = (8, 10, 12, 15, 18, 22)


def local_features(pictures: Sequence[Picture]) -> tuple[list[LocalFeatures], float]:
    """Each picture's local features as the server would find them (from its JPEG), and
    the milliseconds per picture."""
    started = time.perf_counter()
    found = []
    for p in pictures:
        out = io.BytesIO()
        p.image.save(out, "JPEG", quality=95)
        found.append(keypoints.extract(Image.open(io.BytesIO(out.getvalue())).convert("RGB")))
    return found, 1000 * (time.perf_counter() - started) / max(1, len(pictures))


def query_features(pictures: Sequence[Picture]) -> list[Query]:
    """Each query's local features as the server finds them for a verified search (from
    its JPEG, in the image and its mirror image)."""
    found = []
    for p in pictures:
        out = io.BytesIO()
        p.image.save(out, "JPEG", quality=95)
        found.append(make_query_features(out.getvalue(), DecodeLimits()))
    return found


def verdicts_of(
    scores: npt.NDArray[np.float32],
    catalog: Sequence[LocalFeatures],
    query: Query,
    k: int,
) -> dict[int, Verdict]:
    """One query's verdicts on its top ``k`` catalog items (by ``scores``, its row), with
    no threshold: ``at`` applies one."""
    top = np.argsort(-scores)[:k]
    upright, mirrored = query
    return {
        int(i): verification.verify_copy(upright, mirrored, catalog[i], 0, hamming.two_nearest)
        for i in top
    }


def at(verdict: Verdict, threshold: int) -> Verdict:
    return dataclasses.replace(verdict, verified=verdict.inliers >= threshold)


def reranked(
    scores: npt.NDArray[np.float32],
    verdicts: dict[int, Verdict],
    k: int,
    threshold: int,
    by_coverage: bool = True,
) -> list[int]:
    """The top ``k`` re-ranked as the server ranks them (``verification.rank_key``), or
    with ``by_coverage`` off by inliers alone."""
    top = [int(i) for i in np.argsort(-scores)[:k]]

    def key(i: int) -> tuple[bool, float, int, float]:
        v = at(verdicts[i], threshold)
        if not by_coverage:
            v = dataclasses.replace(v, coverage=0.0)
        return verification.rank_key(v, float(scores[i]))

    return sorted(top, key=key)


def micro_ap(confidence: Sequence[float], right: Sequence[bool], positives: int) -> float:
    """µAP of answers (``confidence``, ``right``) when ``positives`` answers could be right."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    hits = np.asarray(right)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(1, positives))


def recall_at_false_positives(
    confidence: Sequence[float], right: Sequence[bool], is_copy: Sequence[bool], rate: float
) -> float:
    """The share of copy queries answered right above the confidence that at most ``rate``
    of the non-copy queries reach."""
    c, r, copy = np.asarray(confidence), np.asarray(right), np.asarray(is_copy)
    negatives = np.sort(c[~copy])[::-1]
    allowed = int(rate * len(negatives))
    threshold = negatives[allowed] if allowed < len(negatives) else -np.inf
    return float((r & copy & (c > threshold)).sum() / max(1, copy.sum()))


def measure(
    bench: Benchmark,
    catalog_rows: npt.NDArray[np.float32],
    query_rows: npt.NDArray[np.float32],
    others: Sequence[Picture],
    other_rows: npt.NDArray[np.float32],
    shortlists: Sequence[int] = SHORTLISTS,
) -> dict[str, Any]:
    """Top-1 per edit with verification for each shortlist, and copy detection with and
    without it. ``*_rows``: the default embedding's unit rows; ``others``: non-copy queries."""
    catalog_f, item_ms = local_features(bench.catalog)
    started = time.perf_counter()
    query_f = query_features(bench.queries)
    query_ms = 1000 * (time.perf_counter() - started) / max(1, len(query_f))
    other_f = query_features(others)
    index = {p.name: i for i, p in enumerate(bench.catalog)}
    truth = [index[str(q.original)] for q in bench.queries]
    scores = np.concatenate([query_rows, other_rows]) @ catalog_rows.T
    features = [*query_f, *other_f]
    started = time.perf_counter()
    longest = max(shortlists)
    verdicts = [
        verdicts_of(scores[q], catalog_f, features[q], longest) for q in range(len(features))
    ]
    verify_ms = 1000 * (time.perf_counter() - started) / (len(features) * longest)

    def figures(k: int, threshold: int, by_coverage: bool = True) -> dict[str, Any]:
        orders = [
            reranked(scores[q], verdicts[q], k, threshold, by_coverage)
            for q in range(len(features))
        ]
        return _figures(bench, truth, scores, orders, verdicts, threshold)

    default = verification.MIN_INLIERS
    sizes = [len(f.to_bytes()) for f in catalog_f]
    return {
        "min_inliers": default,
        "shortlists": {str(k): figures(k, default) for k in shortlists},
        "thresholds": {str(t): figures(shortlists[0], t) for t in THRESHOLDS},
        "by_inliers_alone": figures(shortlists[0], default, by_coverage=False),
        "verify_ms_per_candidate": round(verify_ms, 3),
        "unverified": _unverified(bench, truth, scores),
        "non_copy_queries": len(others),
        "extract_ms_per_item": round(item_ms, 2),
        "extract_ms_per_query": round(query_ms, 2),
        "bytes_per_item": {"mean": int(np.mean(sizes)), "max": int(np.max(sizes))},
    }


def _figures(
    bench: Benchmark,
    truth: list[int],
    scores: npt.NDArray[np.float32],
    orders: list[list[int]],
    verdicts: list[dict[int, Verdict]],
    threshold: int,
) -> dict[str, Any]:
    copies = len(truth)
    first = [order[0] for order in orders]
    verified = [verdicts[q][first[q]].inliers >= threshold for q in range(len(orders))]
    confidence = [
        1.0 + verdicts[q][first[q]].inliers if verified[q] else float(scores[q, first[q]])
        for q in range(len(orders))
    ]
    right = [q < copies and first[q] == truth[q] for q in range(len(orders))]
    per_edit: dict[str, list[bool]] = {}
    for q, query in enumerate(bench.queries):
        per_edit.setdefault(query.edit, []).append(right[q])
    is_copy = [q < copies for q in range(len(orders))]
    return {
        "top1": round(float(np.mean(right[:copies])), 4),
        "per_edit_top1": {e: round(float(np.mean(v)), 4) for e, v in per_edit.items()},
        "micro_ap": round(micro_ap(confidence, right, copies), 4),
        "recall_at_1pct_fp": round(recall_at_false_positives(confidence, right, is_copy, 0.01), 4),
        "copies_verified_wrong": sum(verified[q] and not right[q] for q in range(copies)),
        "non_copies_verified": sum(verified[copies:]),
    }


def _unverified(
    bench: Benchmark, truth: list[int], scores: npt.NDArray[np.float32]
) -> dict[str, Any]:
    copies = len(truth)
    first = np.argmax(scores, axis=1)
    right = [q < copies and int(first[q]) == truth[q] for q in range(len(scores))]
    confidence = [float(scores[q, first[q]]) for q in range(len(scores))]
    is_copy = [q < copies for q in range(len(scores))]
    return {
        "top1": round(float(np.mean(right[:copies])), 4),
        "micro_ap": round(micro_ap(confidence, right, copies), 4),
        "recall_at_1pct_fp": round(recall_at_false_positives(confidence, right, is_copy, 0.01), 4),
    }
