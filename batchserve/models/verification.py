"""Geometric verification: is one image a copy of another? Their local features
(keypoints.py) are matched by descriptor (Hamming distance, Lowe's ratio test), and a
similarity transform (rotation, uniform scale, shift) is fitted to the matches by RANSAC.
A copy (cropped, zoomed, rotated, greyed, re-encoded, written over) shares many points in
one consistent geometry; a look-alike shares few, and not in one geometry. The inliers of
the fitted transform are the evidence."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batchserve.models.keypoints import LocalFeatures
from batchserve.settings import setting

#: Lowe's ratio: a match counts when its best distance is under this share of the second
#: best (a point like many others matches none of them).
RATIO = 0.8
#: RANSAC's tolerance, in pixels of the 480-pixel frame.
TOLERANCE_PX = 6.0
#: The inliers a copy needs by default, chosen on ``python -m bench retrieval`` (copy
#: detection at the top 20, at c72c2be): with 18, 6.6% of its non-copy queries (generated
#: scenes of repeated patterns) verify a match, against 21.2% with 12, at the same top-1
#: (0.878 against 0.877) and a better µAP (0.817 against 0.803).
MIN_INLIERS = 18
#: The scales a copy may be at, either way (a 64-pixel thumbnail of a 640-pixel photo is
#: 10x smaller; both are scaled to the frame, so what remains is the crop's zoom).
MAX_SCALE = 8.0
#: The transform of a copy verified in the query's mirror image.
MIRRORED = "mirrored similarity"

#: Finds the two candidate descriptors nearest each query descriptor: (query, candidate)
#: descriptors [n, 32], [m, 32] -> (Hamming distances [n, 2], candidate indices [n, 2]).
Nearest = Callable[
    [npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
    tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]],
]


@dataclass(frozen=True)
class VerifyPolicy:
    """Whether searches verify by default, how many matches they verify, and how many
    inliers make a copy.

    Chosen on ``python -m bench retrieval`` (bench/RESULTS.md, "Verified by local
    features"): the top 20 find as many originals first as the top 50 or 100, for less
    work; a verified search still costs several times an unverified one (its p50 and
    images/s there), so it is asked for, not on by default; ``MIN_INLIERS`` says why 18."""

    verify: bool = setting(
        False,
        "verify every search by local features unless the request says verify=false (several "
        "times a search's work: bench/RESULTS.md)",
    )
    verify_k: int = setting(
        20,
        "matches of the embedding a verified search verifies (its shortlist); the k asked "
        "are answered from them",
        at_least=1,
        at_most=1000,
    )
    copy_min_inliers: int = setting(
        MIN_INLIERS,
        "inliers (matched keypoints that agree on one transform) that make a verified copy",
        at_least=3,
    )


@dataclass(frozen=True)
class Verdict:
    """``inliers`` matches agree on one transform; ``verified`` when they are at least
    the threshold; ``transform`` names the fitted transform ("similarity") or "none";
    ``coverage``: the share of the query's frame that the candidate's frame covers once
    moved by the transform (1.0: the candidate holds all of the query; a crop of the
    query's original holds a part)."""

    verified: bool
    inliers: int
    transform: str
    coverage: float = 0.0

    @classmethod
    def unmatched(cls) -> Verdict:
        return cls(False, 0, "none")


def two_nearest(
    query: npt.NDArray[np.uint8], candidate: npt.NDArray[np.uint8]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """The Hamming distances [n, 2] and indices [n, 2] of the two candidate descriptors
    nearest each query descriptor, by OpenCV (storage/hamming.py does it by FAISS, about
    3x faster on one core)."""
    import cv2

    distances, indices = cv2.batchDistance(
        query, candidate, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2
    )
    return np.asarray(distances, np.int32), np.asarray(indices, np.int64)


def matched_points(
    query: LocalFeatures,
    candidate: LocalFeatures,
    ratio: float = RATIO,
    nearest: Nearest = two_nearest,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The positions (query's, candidate's) [m, 2] of the descriptor matches that pass
    the ratio test, one per candidate point: a repeated pattern's many query points onto
    one of its points are one piece of evidence (the nearest of them is kept)."""
    if len(query) < 2 or len(candidate) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    distances, indices = nearest(query.descriptors, candidate.descriptors)
    passed = np.flatnonzero(distances[:, 0] < ratio * distances[:, 1])
    targets, best = indices[passed, 0], distances[passed, 0]
    order = np.lexsort((best, targets))  # by candidate point, nearest first (stable)
    kept = order[np.unique(targets[order], return_index=True)[1]]
    return query.points[passed[kept]], candidate.points[targets[kept]]


def distinct_inliers(source: np.ndarray, target: np.ndarray) -> int:
    """How many inlier pairs remain when points at one place (keypoints found at several
    scales of one spot) count once, on either side."""

    def places(points: np.ndarray) -> int:
        return len(np.unique(np.rint(points).astype(np.int32), axis=0))

    return min(places(source), places(target))


def verify(
    query: LocalFeatures,
    candidate: LocalFeatures,
    min_inliers: int = MIN_INLIERS,
    nearest: Nearest = two_nearest,
) -> Verdict:
    """Whether ``candidate`` is a copy of ``query`` (or the other way round), by the
    inliers of a similarity transform between their matched keypoints."""
    import cv2

    source, target = matched_points(query, candidate, nearest=nearest)
    if len(source) < max(3, min_inliers):
        return Verdict.unmatched()
    transform, mask = cv2.estimateAffinePartial2D(
        source, target, method=cv2.RANSAC, ransacReprojThreshold=TOLERANCE_PX, maxIters=2000
    )
    if transform is None or mask is None:
        return Verdict.unmatched()
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    if not 1 / MAX_SCALE <= scale <= MAX_SCALE:
        return Verdict.unmatched()
    inside = mask.ravel().astype(bool)
    inliers = distinct_inliers(source[inside], target[inside])
    shared = coverage(transform, query.size, candidate.size)
    return Verdict(inliers >= min_inliers, inliers, "similarity", shared)


def verify_copy(
    query: LocalFeatures,
    mirrored: LocalFeatures | None,
    candidate: LocalFeatures,
    min_inliers: int = MIN_INLIERS,
    nearest: Nearest = two_nearest,
) -> Verdict:
    """``verify``, and again with the query's ``mirrored`` features (found in its mirror
    image; ORB's descriptors are not the same mirrored), so that a flipped copy is verified
    as a "mirrored similarity": the verdict with more inliers (the upright one on a tie)."""
    upright = verify(query, candidate, min_inliers, nearest)
    if mirrored is None:
        return upright
    flipped = verify(mirrored, candidate, min_inliers, nearest)
    if flipped.inliers <= upright.inliers:
        return upright
    return Verdict(flipped.verified, flipped.inliers, MIRRORED, flipped.coverage)


def coverage(transform: np.ndarray, query: tuple[int, int], candidate: tuple[int, int]) -> float:
    """The share of the query's frame (``query``: width, height) inside the candidate's
    frame mapped back onto it by the inverse of ``transform`` (query -> candidate, 2x3)."""
    import cv2

    back = cv2.invertAffineTransform(transform)
    w, h = candidate
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    mapped = (corners @ back[:, :2].T + back[:, 2]).astype(np.float32)
    qw, qh = query
    frame = np.array([[0, 0], [qw, 0], [qw, qh], [0, qh]], np.float32)
    area, _ = cv2.intersectConvexConvex(frame, mapped)
    return round(float(area) / max(1.0, qw * qh), 3)


def rank_key(verdict: Verdict, score: float) -> tuple[bool, float, int, float]:
    """Sorts verified copies first, those that hold more of the query first (an original
    before its crops), then by inliers; the rest by ``score`` (the embedding's)."""
    if not verdict.verified:
        return (True, 0.0, 0, -score)
    return (False, -verdict.coverage, -verdict.inliers, -score)
