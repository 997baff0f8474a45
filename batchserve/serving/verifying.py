"""Verified search: the embedding's shortlist re-ranked by local features.

A search asked to verify (``verify=true``, or the server's ``--verify`` default) looks up
the embedding's top ``verify_k``. Each of those matches is then verified against the query
by geometric verification of local features (models/verification.py): verified copies come
first (those that hold more of the query first, so an original ranks before its crops),
then the rest by score; the first ``k`` asked are answered, each with its verdict.

The query's features are found on the decode pool, in the image and in its mirror image;
the matches' are read from the catalog on the store thread; the matching runs on the decode
pool (OpenCV releases the GIL while it matches), never on the reactor. A match whose item
has no local features (added before them, or with ``--no-local-features``) is answered
``verified: null``: unverifiable, ranked by its score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from batchserve.models import keypoints, verification
from batchserve.models.images import DecodeLimits, make_query_features
from batchserve.models.keypoints import LocalFeatures
from batchserve.models.verification import VerifyPolicy
from batchserve.serving.records import SearchTask
from batchserve.storage import hamming
from batchserve.storage.records import Match, Verification

#: The query of one verified search: its features, and its mirror image's (None: not
#: found, as for a stored item's, whose image is gone; None for both: it has none).
Query = tuple[LocalFeatures | None, LocalFeatures | None]


def wanted(policy: VerifyPolicy, task: SearchTask) -> bool:
    """Whether a search of ``task`` verifies: as it asks, else the server's default."""
    return policy.verify if task.verify is None else task.verify


def shortlist(policy: VerifyPolicy, task: SearchTask) -> SearchTask:
    """``task`` asking the index for the matches it will verify."""
    return dataclasses.replace(task, k=max(task.k, policy.verify_k))


def image_queries(images: Sequence[bytes], limits: DecodeLimits) -> list[Query]:
    """On the decode pool: each query image's features, upright and mirrored."""
    return [make_query_features(data, limits) for data in images]


def stored_query(packed: bytes | None) -> Query:
    """A stored item as the query (similar items): its features, no mirror image."""
    return (keypoints.unpacked(packed), None)


def rerank_all(
    queries: Sequence[Query],
    found: Sequence[Sequence[Match]],
    stored: Mapping[int, bytes],
    k: int,
    min_inliers: int,
) -> list[list[Match]]:
    """On the decode pool: each query's matches verified and re-ranked (``rerank``)."""
    candidates = {fid: keypoints.unpacked(packed) for fid, packed in stored.items()}
    return [
        rerank(query, matches, candidates, k, min_inliers)
        for query, matches in zip(queries, found, strict=True)
    ]


def rerank(
    query: Query,
    matches: Sequence[Match],
    candidates: Mapping[int, LocalFeatures | None],
    k: int,
    min_inliers: int,
) -> list[Match]:
    """``matches`` (best score first) each with its verification, verified copies first,
    the first ``k``."""
    upright, mirrored = query
    judged = []
    for match in matches:
        features = candidates.get(match.fid)
        if upright is None or features is None:
            verdict, checked = verification.Verdict.unmatched(), Verification(None)
        else:
            verdict = verification.verify_copy(
                upright, mirrored, features, min_inliers, hamming.two_nearest
            )
            checked = Verification(verdict.verified, verdict.inliers, verdict.transform)
        judged.append((verification.rank_key(verdict, match.score), match, checked))
    judged.sort(key=lambda entry: entry[0])  # stable: equal keys keep the score order
    return [dataclasses.replace(m, verification=v) for _key, m, v in judged[:k]]
