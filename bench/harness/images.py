"""Benchmark images: real photos from a directory, or the photos scikit-image ships."""

from __future__ import annotations

import io
from pathlib import Path

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
    from PIL import Image, ImageOps
    from skimage import data

    photos = [
        data.chelsea(),
        data.astronaut(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
    ]
    out = []
    for i in range(count):
        image = Image.fromarray(photos[i % len(photos)]).convert("RGB")
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
