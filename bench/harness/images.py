"""Benchmark images: real photos from a directory, or the photos scikit-image ships."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def from_directory(path: Path, limit: int = 256) -> list[bytes]:
    """Encoded images found under ``path`` (sorted, at most ``limit``), sent as they are."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images under {path}")
    return [p.read_bytes() for p in files[:limit]]


def sample_photos(count: int = 32, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """``count`` JPEG photos of ``size`` (w, h): crops and flips of the real photos that
    scikit-image ships, so every request decodes a realistic camera-sized JPEG."""
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    photos.append(data.hubble_deep_field())
    return variants([Image.fromarray(p) for p in photos], count, size)


def demo_photos(count: int = 32, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """The same from batchserve's own demo photos, where scikit-image is not installed (a
    lent GPU machine)."""
    import importlib.resources

    from PIL import Image

    folder = importlib.resources.files("batchserve").joinpath("data/demo")
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".jpg"))
    photos = [Image.open(io.BytesIO(folder.joinpath(n).read_bytes())) for n in names]
    return variants(photos, count, size)


def variants(photos: list[Any], count: int, size: tuple[int, int]) -> list[bytes]:
    """``count`` JPEGs of ``size``: each photo in turn, cropped a little more on each pass
    through them and mirrored on every other pass."""
    from PIL import ImageOps

    out = []
    for i in range(count):
        image = photos[i % len(photos)].convert("RGB")
        w, h = image.size
        shrink = 1.0 - 0.05 * (i // len(photos) % 6)
        box_w, box_h = int(w * shrink), int(h * shrink)
        left, top = (w - box_w) // 2, (h - box_h) // 2
        image = image.crop((left, top, left + box_w, top + box_h)).resize(size)
        if i // len(photos) % 2:
            image = ImageOps.mirror(image)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
