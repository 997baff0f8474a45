"""Verified search (serving/verifying.py): the embedding's matches re-ranked by local
features, the policy that asks for it, and how a request says so and hears it."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageOps

from batchserve.errors import InvalidInput
from batchserve.http.inputs import search_task
from batchserve.http.wire import match_json
from batchserve.models import keypoints, verification
from batchserve.models.images import DecodeLimits
from batchserve.models.verification import VerifyPolicy
from batchserve.serving import verifying
from batchserve.serving.records import SearchTask
from batchserve.storage.records import Match, Verification
from tests.unit.test_verification import picture, rotated_crop


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def match(item_id: str, score: float, fid: int) -> Match:
    return Match(item_id, score, None, {}, fid=fid)


@pytest.fixture(scope="module")
def stored() -> dict[int, bytes]:
    """Rows 1-3: the original and two other pictures (row 4 has no local features)."""
    return {fid: keypoints.extract(picture(fid)).to_bytes() for fid in (1, 2, 3)}


def test_the_copy_ranks_first_with_its_evidence_however_low_its_score(
    stored: dict[int, bytes],
) -> None:
    [query] = verifying.image_queries([jpeg(rotated_crop(picture(1)))], DecodeLimits())
    found = [match("other", 0.9, 2), match("old", 0.8, 4), match("copy", 0.5, 1)]
    [ranked] = verifying.rerank_all([query], [found], stored, k=3, min_inliers=12)
    assert [m.id for m in ranked] == ["copy", "other", "old"]
    copy, other, old = (m.verification for m in ranked)
    assert copy is not None and copy.verified and copy.inliers >= 12
    assert copy.transform == "similarity"
    assert other == Verification(False, other.inliers, other.transform) and other.inliers < 12
    assert old == Verification(None)  # no local features: unverifiable, ranked by score
    # The k asked are answered, from the shortlist verified.
    [first] = verifying.rerank_all([query], [found], stored, k=1, min_inliers=12)
    assert [m.id for m in first] == ["copy"]


def test_a_flipped_copy_is_verified_through_the_mirror_image(stored: dict[int, bytes]) -> None:
    flipped = ImageOps.mirror(rotated_crop(picture(2)))
    [query] = verifying.image_queries([jpeg(flipped)], DecodeLimits())
    [ranked] = verifying.rerank_all([query], [[match("two", 0.7, 2)]], stored, 1, 12)
    checked = ranked[0].verification
    assert checked is not None and checked.verified
    assert checked.transform == verification.MIRRORED


def test_a_stored_query_without_features_verifies_nothing(stored: dict[int, bytes]) -> None:
    found = [match("a", 0.9, 1), match("b", 0.8, 2)]
    [ranked] = verifying.rerank_all([verifying.stored_query(None)], [found], stored, 2, 12)
    assert [(m.id, m.verification) for m in ranked] == [
        ("a", Verification(None)),
        ("b", Verification(None)),
    ]
    # Features of another version are unverifiable, not misread.
    unreadable = {1: b"\x09" + stored[1][1:]}
    [again] = verifying.rerank_all([verifying.stored_query(stored[1])], [found], unreadable, 2, 12)
    assert again[0].verification == Verification(None)


def test_the_policy_verifies_as_asked_else_as_the_server_says() -> None:
    off, on = VerifyPolicy(), VerifyPolicy(verify=True, verify_k=40)
    wanted, shortlist = verifying.wanted, verifying.shortlist
    assert not wanted(off, SearchTask()) and wanted(off, SearchTask(verify=True))
    assert wanted(on, SearchTask()) and not wanted(on, SearchTask(verify=False))
    assert shortlist(on, SearchTask(k=5)).k == 40 and shortlist(on, SearchTask(k=60)).k == 60


def test_a_request_says_verify_in_its_query_string_or_json() -> None:
    assert search_task({}).verify is None
    assert search_task({"verify": "true"}).verify is True
    assert search_task({"verify": False}).verify is False
    with pytest.raises(InvalidInput, match="verify must be true or false"):
        search_task({"verify": "maybe"})


def test_a_match_says_its_verification_only_when_the_search_verified() -> None:
    plain = match("a", 0.5, 1)
    assert "verified" not in match_json(plain)
    checked = Match("a", 0.5, None, {}, verification=Verification(True, 31, "similarity"))
    assert match_json(checked) == {
        **match_json(plain),
        "verified": True,
        "inliers": 31,
        "transform": "similarity",
    }
    assert (
        match_json(Match("a", 0.5, None, {}, verification=Verification(None)))["verified"] is None
    )
