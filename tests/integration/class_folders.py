"""Class folders of texture crops for the training tests: crops of photos scikit-image
ships, one class per texture, written as JPEG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Classes of ``write_class_folders``: crops of texture photos scikit-image ships, and
#: synthetic patterns.
PATTERN_CLASSES = ("brick", "grass", "gravel", "stripes", "checkers")


def pattern_image(kind: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """One image of class ``kind``: a random crop of the texture photo, or a random
    instance of the pattern (angle, frequency, colours), flipped and lit at random."""
    if kind in ("brick", "grass", "gravel"):
        from skimage import data

        photo = np.asarray(getattr(data, kind)())
        side = int(min(photo.shape[:2]) * rng.uniform(0.3, 0.7))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        image = Image.fromarray(photo[top : top + side, left : left + side]).convert("RGB")
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    else:
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == "stripes":
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(8, 24)
            phase = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
            mix = (phase > 0).astype(np.float64)
        elif kind == "checkers":
            cell = rng.uniform(8, 24)
            mix = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float64)
        else:
            raise ValueError(f"unknown pattern class {kind!r}")
        pixels = mix[..., None] * a + (1 - mix[..., None]) * b
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.8, 1.2)
    lit = np.clip(np.asarray(image, dtype=np.float64) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(lit)


def write_class_folders(
    root: Path, per_class: int, seed: int = 0, classes: Sequence[str] = PATTERN_CLASSES
) -> dict[str, list[Path]]:
    """``root/<class>/<n>.jpg``: ``per_class`` images of each class, different per seed."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        written[kind] = []
        for i in range(per_class):
            path = folder / f"{seed}-{i}.jpg"
            pattern_image(kind, rng).save(path, format="JPEG", quality=90)
            written[kind].append(path)
    return written
