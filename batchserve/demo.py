"""Sample photos to search on a first start: the real photos that scikit-image ships inside
its wheel (nothing is downloaded)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

#: (item id, label, loader name in skimage.data, frame index for loaders returning several)
SAMPLES: tuple[tuple[str, str, str, int | None], ...] = (
    ("sample/astronaut", "people", "astronaut", None),
    ("sample/camera", "people", "camera", None),
    ("sample/cat", "animals", "chelsea", None),
    ("sample/coffee", "food", "coffee", None),
    ("sample/rocket", "vehicles", "rocket", None),
    ("sample/motorcycle", "vehicles", "stereo_motorcycle", 0),
    ("sample/hubble", "space", "hubble_deep_field", None),
    ("sample/moon", "space", "moon", None),
    ("sample/coins", "objects", "coins", None),
    ("sample/brick", "textures", "brick", None),
    ("sample/grass", "textures", "grass", None),
    ("sample/gravel", "textures", "gravel", None),
    ("sample/retina", "science", "retina", None),
    ("sample/ihc", "science", "immunohistochemistry", None),
    ("sample/page", "documents", "page", None),
    ("sample/text", "documents", "text", None),
)


def sample_photos() -> list[tuple[str, str, bytes]]:
    """(id, label, JPEG bytes) of every sample photo this scikit-image has offline."""
    from PIL import Image
    from skimage import data

    photos = []
    for item_id, label, name, frame in SAMPLES:
        loader: Callable[[], Any] | None = getattr(data, name, None)
        if loader is None:
            continue
        try:
            pixels = loader()
        except Exception:
            continue
        if frame is not None:
            pixels = pixels[frame]
        out = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").save(out, format="JPEG", quality=92)
        photos.append((item_id, label, out.getvalue()))
    return photos
