"""Sample photos to search on a first start: eight public-domain and CC0 photos from
scikit-image's sample data, shipped as package data in ``batchserve/data/demo/`` (JPEG, at
most 512 px on the long side; sources and licences in ``SOURCES.md`` there). Nothing is
downloaded and scikit-image is not needed to serve them."""

from __future__ import annotations

import importlib.resources

#: (item id, label, file name in batchserve/data/demo/)
SAMPLES: tuple[tuple[str, str, str], ...] = (
    ("sample/astronaut", "people", "astronaut.jpg"),
    ("sample/camera", "people", "camera.jpg"),
    ("sample/cat", "animals", "cat.jpg"),
    ("sample/coffee", "food", "coffee.jpg"),
    ("sample/rocket", "vehicles", "rocket.jpg"),
    ("sample/brick", "textures", "brick.jpg"),
    ("sample/retina", "science", "retina.jpg"),
    ("sample/text", "documents", "text.jpg"),
)


def sample_photos() -> list[tuple[str, str, bytes]]:
    """(id, label, JPEG bytes) of every sample photo, in ``SAMPLES`` order."""
    folder = importlib.resources.files("batchserve") / "data" / "demo"
    return [(item_id, label, (folder / name).read_bytes()) for item_id, label, name in SAMPLES]
