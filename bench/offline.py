"""The limit: decoding and embedding the same images with no HTTP, on the same cores."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from batchserve.images import DecodeLimits, decode_image


def decode_rate(images: list[bytes], size: tuple[int, int], seconds: float = 3.0) -> float:
    """Images/s decoded and resized to ``size`` on one thread."""
    limits = DecodeLimits()
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode_image(images[count % len(images)], size, limits)
        count += 1
    return count / (time.perf_counter() - started)


def model_rates(
    batch_sizes: list[int], seconds: float = 4.0, model_args: dict[str, object] | None = None
) -> tuple[str, dict[int, float]]:
    """The model's own images/s at each batch size (pre-decoded uint8 input)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchserve.models import ModelSpec, load_model

    model = load_model(ModelSpec(**(model_args or {})))  # type: ignore[arg-type]
    height, width = model.info.input_size
    rng = np.random.default_rng(0)
    rates = {}
    for size in batch_sizes:
        batch = rng.integers(0, 256, (size, height, width, 3), dtype=np.uint8)
        model.predict(batch)
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.predict(batch)
            done += size
        rates[size] = done / (time.perf_counter() - started)
    return model.info.name, rates


def limit_rate(
    images: list[bytes],
    batch: int = 32,
    decode_threads: int = 1,
    seconds: float = 10.0,
    model_args: dict[str, object] | None = None,
) -> float:
    """The limit: images/s of a loop that decodes (on ``decode_threads`` threads, ahead of
    the model) and embeds the same images at the best batch size, with no HTTP."""
    from concurrent.futures import ThreadPoolExecutor

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchserve.models import ModelSpec, load_model

    model = load_model(ModelSpec(**(model_args or {})))  # type: ignore[arg-type]
    size = model.info.input_size
    limits = DecodeLimits()
    model.predict(np.zeros((batch, *size, 3), dtype=np.uint8))
    done = 0
    with ThreadPoolExecutor(decode_threads) as pool:

        def decode_batch(first: int) -> list[Any]:
            return [
                pool.submit(decode_image, images[(first + j) % len(images)], size, limits)
                for j in range(batch)
            ]

        started = time.perf_counter()
        upcoming = decode_batch(0)
        while time.perf_counter() - started < seconds:
            arrays = [f.result() for f in upcoming]
            upcoming = decode_batch(done + batch)  # decodes while the model runs
            model.predict(np.stack(arrays))
            done += batch
        elapsed = time.perf_counter() - started
    return done / elapsed
