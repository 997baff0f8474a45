"""What both baselines share: decoding a request body and the JSON answer."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from batchserve.models.images import DecodeLimits, decode_image

SIZE = (160, 160)


def decode(body: bytes) -> np.ndarray:
    return decode_image(body, SIZE, DecodeLimits())


def answer(embedding: Any) -> str:
    vector = np.asarray(embedding, dtype=np.float64).ravel()
    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return json.dumps({"results": [{"embedding": np.round(vector, 8).tolist()}]})
