"""Local features and geometric verification: bounds, the packed format, and copies told
from look-alikes on synthetic transforms of a textured picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from batchserve.models import keypoints, verification
from batchserve.models.keypoints import LocalFeatures, UnreadableFeatures


def picture(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A textured picture: random shapes over noise blobs, different for each seed."""
    rng = np.random.default_rng(seed)
    blobs = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    image = Image.fromarray(blobs).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        r = int(rng.integers(6, 40))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
    return image


def rotated_crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    turned = image.rotate(15, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
    return turned.crop((w // 8, h // 8, w - w // 6, h - h // 5))


def grey_zoom(image: Image.Image) -> Image.Image:
    w, h = image.size
    zoomed = image.crop((w // 4, h // 4, w * 3 // 4, h * 3 // 4)).resize((w, h))
    return ImageOps.grayscale(zoomed).convert("RGB")


def small_with_banner(image: Image.Image) -> Image.Image:
    small = image.resize((240, 180), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(small)
    draw.rectangle((0, 150, 240, 180), fill=(200, 20, 40))
    draw.text((6, 158), "FREE SHIPPING", fill=(255, 255, 255))
    return small


def test_features_are_bounded_and_found_in_the_frame() -> None:
    found = keypoints.extract(picture(1, (1600, 1200)))
    assert 100 < len(found) <= keypoints.MAX_KEYPOINTS
    assert found.size == (keypoints.FRAME, keypoints.FRAME * 3 // 4)
    assert (found.points >= 0).all() and (found.points[:, 0] < found.size[0]).all()
    assert len(found.to_bytes()) <= 7 + 36 * keypoints.MAX_KEYPOINTS


def test_a_flat_image_has_no_features_and_verifies_nothing() -> None:
    flat = keypoints.extract(Image.new("RGB", (300, 200), (120, 130, 140)))
    assert len(flat) == 0
    assert flat.size == (480, 320)
    assert not verification.verify(flat, keypoints.extract(picture(2))).verified


def test_the_packed_form_round_trips_and_refuses_other_versions() -> None:
    found = keypoints.extract(picture(3))
    back = LocalFeatures.from_bytes(found.to_bytes())
    assert back.size == found.size
    assert np.array_equal(back.descriptors, found.descriptors)
    assert np.abs(back.points - found.points).max() <= 0.5
    with pytest.raises(UnreadableFeatures):
        LocalFeatures.from_bytes(b"\x02" + found.to_bytes()[1:])
    with pytest.raises(UnreadableFeatures):
        LocalFeatures.from_bytes(found.to_bytes()[:-1])
    with pytest.raises(UnreadableFeatures):
        LocalFeatures.from_bytes(b"\x01")


@pytest.mark.parametrize("edit", [rotated_crop, grey_zoom, small_with_banner])
def test_an_edited_copy_verifies_with_many_inliers(edit) -> None:  # type: ignore[no-untyped-def]
    """At least 12 inliers, where other pictures have fewer. The default threshold is 18
    (bench retrieval chose it, for fewer false copies): the grey 2x zoom of this small
    synthetic picture, 15 inliers, is not a copy there."""
    original = picture(4)
    verdict = verification.verify(
        keypoints.extract(edit(original)), keypoints.extract(original), min_inliers=12
    )
    assert verdict.verified, verdict
    assert verdict.transform == "similarity"


def test_a_different_picture_of_the_same_kind_does_not_verify() -> None:
    for seed in (5, 6, 7):
        verdict = verification.verify(
            keypoints.extract(picture(seed)), keypoints.extract(picture(seed + 10))
        )
        assert not verdict.verified, (seed, verdict)
        assert verdict.inliers < 12


def test_many_query_points_on_one_candidate_point_count_once() -> None:
    """A repeated pattern: every query point's best match is the candidate's one point."""
    rng = np.random.default_rng(0)
    descriptor = rng.integers(0, 255, (1, 32), dtype=np.uint8)
    far = descriptor ^ 0xFF  # every bit differs: the second-best match is far
    query = LocalFeatures(
        rng.uniform(0, 400, (40, 2)).astype(np.float32),
        np.repeat(descriptor, 40, axis=0),
        (480, 360),
    )
    candidate = LocalFeatures(
        np.array([[100, 100], [300, 200]], np.float32),
        np.concatenate([descriptor, far]),
        (480, 360),
    )
    source, target = verification.matched_points(query, candidate)
    assert len(source) == len(target) == 1
    assert not verification.verify(query, candidate, min_inliers=1).verified


def test_keypoints_found_twice_at_one_place_count_once() -> None:
    points = np.array([[10, 10], [10.2, 9.9], [50, 60], [80, 20]], np.float32)
    assert verification.distinct_inliers(points, points + 5) == 3


def test_a_copy_that_holds_all_of_the_query_ranks_before_a_crop_with_more_inliers() -> None:
    original = picture(8)
    w, h = original.size
    query = keypoints.extract(original.crop((w // 10, h // 10, w * 8 // 10, h * 8 // 10)))
    whole = verification.verify(query, keypoints.extract(original))
    part = verification.verify(query, keypoints.extract(original.crop((0, 0, w // 2, h // 2))))
    assert whole.verified and part.verified
    assert whole.coverage > 0.95 and part.coverage < 0.6
    unverified = verification.Verdict.unmatched()
    ranked = sorted(
        [("part", part, 0.9), ("whole", whole, 0.8), ("other", unverified, 0.95)],
        key=lambda r: verification.rank_key(r[1], r[2]),
    )
    assert [name for name, _v, _s in ranked] == ["whole", "part", "other"]


def test_a_mirrored_copy_verifies_against_the_mirror_images_features() -> None:
    original = picture(4)
    flipped = ImageOps.mirror(rotated_crop(original))
    candidate = keypoints.extract(original)
    upright, mirrored = keypoints.extract(flipped), keypoints.extract(ImageOps.mirror(flipped))
    assert not verification.verify(upright, candidate).verified  # ORB does not see a mirror
    verdict = verification.verify_copy(upright, mirrored, candidate)
    assert verdict.verified and verdict.transform == verification.MIRRORED
    # Without the mirror image, what the upright query found.
    assert verification.verify_copy(upright, None, candidate) == verification.verify(
        upright, candidate
    )


def test_faiss_finds_the_same_two_nearest_descriptors_as_opencv() -> None:
    from batchserve.storage import hamming

    query, candidate = keypoints.extract(picture(5)), keypoints.extract(rotated_crop(picture(5)))
    by_opencv = verification.two_nearest(query.descriptors, candidate.descriptors)
    by_faiss = hamming.two_nearest(query.descriptors, candidate.descriptors)
    np.testing.assert_array_equal(by_opencv[0], by_faiss[0])  # distances; equal ones may swap
    assert verification.verify(query, candidate) == verification.verify(
        query, candidate, nearest=hamming.two_nearest
    )
