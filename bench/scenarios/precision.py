"""``python -m bench precision``: OpenVINO in bfloat16 against float32, the model as the
server runs it. The retrieval benchmark's catalog and edited queries (bench/scenarios/
retrieval_data.py) are decoded as the server decodes them and embedded by the built-in model
on ``--backend openvino`` at each precision: how often the original is found first, how far
the embeddings move, and the model's images/s. bfloat16 becomes the default only if it
finds as many originals."""

from __future__ import annotations

import io
import tempfile
import time
from typing import Any

import numpy as np

from batchserve.models.images import DecodeLimits, decode_image
from batchserve.models.spec import ModelSpec
from bench.scenarios.retrieval import ranks, summary
from bench.scenarios.retrieval_data import EDITS, QUICK_EDITS, Benchmark, Picture, build

PRECISIONS = ("f32", "bf16")
BATCH = 32


def _pixels(pictures: list[Picture], size: tuple[int, int]) -> np.ndarray:
    """Each picture as a JPEG, decoded as the server decodes it (borders trimmed)."""
    limits = DecodeLimits()
    out = []
    for picture in pictures:
        encoded = io.BytesIO()
        picture.image.convert("RGB").save(encoded, "JPEG", quality=95)
        out.append(decode_image(encoded.getvalue(), size, limits, trim_borders=True))
    return np.stack(out)


def _embed(model: Any, pixels: np.ndarray) -> np.ndarray:
    parts = [model.predict(pixels[i : i + BATCH]).embeddings for i in range(0, len(pixels), BATCH)]
    return np.concatenate(parts)


def _rate(model: Any, pixels: np.ndarray, size: int, seconds: float) -> float:
    batch = pixels[:size]
    model.predict(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(batch)
        done += size
    return done / (time.perf_counter() - started)


def measure(quick: bool = False, seconds: float = 2.0, rounds: int = 3) -> dict[str, Any]:
    """Search quality at each precision, then the model's images/s at batch 1 and 32,
    the precisions in turn for ``rounds`` rounds (the median quoted)."""
    from batchserve.models.loaders import load_model

    if quick:
        bench: Benchmark = build(scenes=12, distractor_scenes=150, edits=QUICK_EDITS, real=8)
    else:
        bench = build(scenes=60, distractor_scenes=900, edits=tuple(EDITS))
    cache = tempfile.mkdtemp(prefix="batchserve-precision-")
    models = {
        p: load_model(ModelSpec(backend="openvino", precision=p, model_cache=cache))
        for p in PRECISIONS
    }
    size = models["f32"].info.input_size
    catalog_pixels, query_pixels = _pixels(bench.catalog, size), _pixels(bench.queries, size)
    figures: dict[str, Any] = {}
    queries: dict[str, np.ndarray] = {}
    for precision, model in models.items():
        catalog, queries[precision] = _embed(model, catalog_pixels), _embed(model, query_pixels)
        figures[precision] = summary(ranks(catalog, queries[precision], bench))
    rates: dict[str, dict[int, list[float]]] = {p: {1: [], BATCH: []} for p in PRECISIONS}
    for _ in range(rounds):
        for precision, model in models.items():
            for n in (1, BATCH):
                rates[precision][n].append(_rate(model, query_pixels, n, seconds))
    for precision in PRECISIONS:
        figures[precision]["images_per_s"] = {
            str(n): round(float(np.median(r)), 1) for n, r in rates[precision].items()
        }
    cosines = (queries["f32"] * queries["bf16"]).sum(axis=1)
    return {
        "catalog": len(bench.catalog),
        "queries": len(bench.queries),
        "rounds": rounds,
        "precisions": figures,
        "min_cosine": round(float(cosines.min()), 5),
        "mean_cosine": round(float(cosines.mean()), 5),
    }
