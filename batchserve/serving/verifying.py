"""Verified search: the embedding's shortlist re-ranked by local features.

A search asked to verify (``verify=true``, or the server's ``--verify`` default) looks up
the embedding's top ``verify_k``. Each of those matches is then verified against the query
by geometric verification of local features (models/verification.py): verified copies come
first (those that hold more of the query first, so an original ranks before its crops),
then the rest by score; the first ``k`` asked are answered, each with its verdict.

The query's features are found on the decode pool, in the image and in its mirror image;
the matches' are read from the catalog on the store thread; the matching runs on the decode
pool, split among its threads (FAISS and OpenCV release the GIL), never on the reactor.
A match whose item has no local features (added before them, or with
``--no-local-features``) is answered ``verified: null``: unverifiable, ranked by its score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.python.failure import Failure

from batchserve.models import keypoints, verification
from batchserve.models.images import DecodeLimits, make_query_features
from batchserve.models.keypoints import LocalFeatures
from batchserve.models.verification import VerifyPolicy
from batchserve.serving.records import SearchTask
from batchserve.serving.threads import PoolRunner
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


#: A match verified: its rank key (``verification.rank_key``), and the match with its
#: verification.
Judged = tuple[tuple[bool, float, int, float], Match]
#: The fewest candidates a pool call verifies (fewer cost more to hand over than to do).
MIN_PART = 8


def judge(
    query: Query, matches: Sequence[Match], stored: Mapping[int, bytes], min_inliers: int
) -> list[Judged]:
    """On the decode pool: each of ``matches`` verified against ``query`` by its packed
    local features in ``stored`` (by fid; none: unverifiable), with its rank key."""
    upright, mirrored = query
    judged = []
    for match in matches:
        features = keypoints.unpacked(stored.get(match.fid))
        if upright is None or features is None:
            verdict, checked = verification.Verdict.unmatched(), Verification(None)
        else:
            verdict = verification.verify_copy(
                upright, mirrored, features, min_inliers, hamming.two_nearest
            )
            checked = Verification(verdict.verified, verdict.inliers, verdict.transform)
        key = verification.rank_key(verdict, match.score)
        judged.append((key, dataclasses.replace(match, verification=checked)))
    return judged


def ranked(judged: list[Judged], k: int) -> list[Match]:
    """Verified copies first (``rank_key``), the rest in score order; the first ``k``."""
    judged.sort(key=lambda entry: entry[0])  # stable: equal keys keep the score order
    return [match for _key, match in judged[:k]]


def rerank_all(
    queries: Sequence[Query],
    found: Sequence[Sequence[Match]],
    stored: Mapping[int, bytes],
    k: int,
    min_inliers: int,
) -> list[list[Match]]:
    """Each query's matches verified and re-ranked, in this thread."""
    return [
        ranked(judge(query, matches, stored, min_inliers), k)
        for query, matches in zip(queries, found, strict=True)
    ]


class Verifier:
    """Verifies on the decode pool: each query's matches split among up to ``parts`` pool
    calls at once (one per decode thread, so that one search uses every core), ranked on
    the reactor once all are in."""

    def __init__(self, run_in_pool: PoolRunner, parts: int) -> None:
        self._run_in_pool = run_in_pool
        self._parts = max(1, parts)

    def rerank(
        self,
        queries: Sequence[Query],
        found: Sequence[Sequence[Match]],
        stored: Mapping[int, bytes],
        k: int,
        min_inliers: int,
    ) -> Deferred[list[list[Match]]]:
        calls: list[tuple[int, Deferred[list[Judged]]]] = []
        for number, (query, matches) in enumerate(zip(queries, found, strict=True)):
            size = max(MIN_PART, math.ceil(len(matches) / self._parts))
            for start in range(0, len(matches), size):
                part = matches[start : start + size]
                calls.append((number, self._run_in_pool(judge, query, part, stored, min_inliers)))

        def merged(parts: list[list[Judged]]) -> list[list[Match]]:
            per_query: list[list[Judged]] = [[] for _query in queries]
            for (number, _call), judged in zip(calls, parts, strict=True):
                per_query[number].extend(judged)
            return [ranked(judged, k) for judged in per_query]

        every = gatherResults([call for _number, call in calls], consumeErrors=True)
        return every.addCallback(merged).addErrback(_first_error)


def _first_error(failure: Failure) -> Failure:
    """``gatherResults``'s FirstError as the failure it wraps (a bad image: its 400)."""
    error = failure.value
    if isinstance(error, FirstError):
        wrapped: Failure = error.subFailure
        return wrapped
    return failure
