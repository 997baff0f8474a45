"""Peer (c): BentoML 1.4, one service with a batchable API (adaptive batching) around the
same model on the same runtime as batchserve's default (the built-in model's compiled
``tf.function``): the peer users most often pick. One worker, as one batchserve process.

  BENTOML_DO_NOT_TRACK=true python -m bentoml serve \\
      bench.baselines.bentoml_service:Embedder --host 127.0.0.1 --port 8093

Requests are multipart, one file in the field ``image``: BentoML gathers the files of
concurrent requests into one call of ``embed``."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bentoml
import numpy as np
from PIL import Image

from bench.baselines.common import SIZE

#: As batchserve's default: batches of up to 32, a batch waiting at most this long to fill.
MAX_BATCH_SIZE = 32
MAX_LATENCY_MS = 1000


def pixels(image: Image.Image) -> np.ndarray:
    """An uploaded image as the model's uint8 input (JPEG decoded at a reduced scale where
    it can be, as batchserve and the Flask baselines decode)."""
    image.draft("RGB", (SIZE[1], SIZE[0]))
    return np.asarray(image.convert("RGB").resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR))


@bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 1024})
class Embedder:
    def __init__(self) -> None:
        from batchserve.models.loaders import load_model
        from batchserve.models.spec import ModelSpec

        self.model = load_model(ModelSpec(backend="tensorflow"))
        self.model.predict(np.zeros((1, *SIZE, 3), dtype=np.uint8))  # compile before serving

    @bentoml.api(  # type: ignore[untyped-decorator]
        route="/v1/embed",
        batchable=True,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def embed(self, image: list[Image.Image]) -> np.ndarray:
        return self.model.predict(np.stack([pixels(i) for i in image])).embeddings
