"""Local features of an image, for verifying that one image is a copy of another: ORB
keypoints (OpenCV) on the image's grey pixels at a bounded size, packed into a few KB.

A packed set is ``LocalFeatures.to_bytes()``: a 7-byte header (version, count, the frame's
width and height) then each keypoint's position in the frame (two uint16) and its 32-byte
binary descriptor, 36 bytes a keypoint, at most ``MAX_KEYPOINTS`` of them (14,407 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

#: The packed format's version; a set packed otherwise is refused, not misread.
VERSION = 1
#: The most keypoints kept of an image (the strongest first).
MAX_KEYPOINTS = 400
#: The longer side of the frame features are found in: an image is scaled to it (down, or
#: up from a thumbnail), so that keypoints of a copy at any size land at the same scale.
FRAME = 480
#: The bytes of one keypoint's ORB descriptor.
DESCRIPTOR_BYTES = 32
_HEADER = struct.Struct("<BHHH")


class UnreadableFeatures(ValueError):
    """Packed local features that are not this version's."""


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoint positions [n, 2] (x, y in the frame's pixels) and their descriptors
    [n, 32] (uint8), in a frame of ``size`` (width, height)."""

    points: npt.NDArray[np.float32]
    descriptors: npt.NDArray[np.uint8]
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.points)

    def to_bytes(self) -> bytes:
        xy = np.clip(np.rint(self.points), 0, 65535).astype("<u2")
        header = _HEADER.pack(VERSION, len(self), *self.size)
        return header + xy.tobytes() + np.ascontiguousarray(self.descriptors).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalFeatures:
        if len(data) < _HEADER.size:
            raise UnreadableFeatures(f"{len(data)} bytes are too few for local features")
        version, n, width, height = _HEADER.unpack_from(data)
        points_end = _HEADER.size + 4 * n
        if version != VERSION or len(data) != points_end + DESCRIPTOR_BYTES * n:
            raise UnreadableFeatures(f"local features of version {version}, {len(data)} bytes")
        xy = np.frombuffer(data, "<u2", 2 * n, _HEADER.size).reshape(n, 2)
        descriptors = np.frombuffer(data, np.uint8, DESCRIPTOR_BYTES * n, points_end)
        return cls(xy.astype(np.float32), descriptors.reshape(n, DESCRIPTOR_BYTES), (width, height))


def frame_of(rgb: Image.Image, frame: int = FRAME) -> npt.NDArray[np.uint8]:
    """``rgb``'s grey pixels, scaled so that its longer side is ``frame``."""
    scale = frame / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    grey = rgb.convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(grey)


def extract(rgb: Image.Image, limit: int = MAX_KEYPOINTS) -> LocalFeatures:
    """The ``limit`` strongest ORB keypoints of ``rgb`` (an upright RGB image) and their
    descriptors. A flat image may have none. OpenCV releases the GIL while it works."""
    import cv2

    grey = frame_of(rgb)
    orb = cv2.ORB.create(nfeatures=limit, fastThreshold=12)
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    size = (grey.shape[1], grey.shape[0])
    if descriptors is None or not keypoints:
        return LocalFeatures(
            np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES), np.uint8), size
        )
    points = np.array([k.pt for k in keypoints], np.float32)
    return LocalFeatures(points[:limit], np.asarray(descriptors[:limit], np.uint8), size)


def unpacked(packed: bytes | None) -> LocalFeatures | None:
    """Packed local features, or None for none or for another version's."""
    if packed is None:
        return None
    try:
        return LocalFeatures.from_bytes(packed)
    except UnreadableFeatures:  # another version's: unverifiable, never misread
        return None
