"""The limit: decoding and embedding the same images with no HTTP, on the same cores."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from batchserve.models.images import DecodeLimits, decode_image


def _load(model_args: dict[str, object] | None) -> Any:
    """The served model, as the server loads it (``model_args``: ModelSpec fields)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchserve.models.loaders import load_model
    from batchserve.models.spec import ModelSpec

    return load_model(ModelSpec(**(model_args or {})))  # type: ignore[arg-type]


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
    model = _load(model_args)
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


def paced_single_ms(
    gap_s: float = 1.0, calls: int = 20, model_args: dict[str, object] | None = None
) -> float:
    """p50 ms of the model at batch 1 called once per ``gap_s``, as at low load: caches and
    TensorFlow's thread pool go cold between calls, which back-to-back calls never see."""
    model = _load(model_args)
    batch = np.zeros((1, *model.info.input_size, 3), dtype=np.uint8)
    for _ in range(10):
        model.predict(batch)
    times = []
    for _ in range(calls):
        time.sleep(gap_s)
        started = time.perf_counter()
        model.predict(batch)
        times.append(time.perf_counter() - started)
    return 1000.0 * float(np.median(times))


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

    model = _load(model_args)
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


def measure(images: list[bytes], limit_s: float = 10.0) -> dict[str, Any]:
    """Section 1 of RESULTS.md: the model alone per batch size, decoding alone, the limit
    (its loop run for ``limit_s``; the others in proportion), and the model at batch 1
    back to back and paced as at low load."""
    name, rates = model_rates([1, 2, 4, 8, 16, 32], seconds=0.4 * limit_s)
    return {
        "model": name,
        "images": len(images),
        "batch_images_per_s": {str(size): round(rate, 1) for size, rate in rates.items()},
        "decode_per_s": round(decode_rate(images, (160, 160), seconds=0.3 * limit_s), 1),
        "limit_per_s": round(limit_rate(images, seconds=limit_s), 1),
        "single_ms": round(1000.0 / rates[1], 2),
        "paced_ms": round(paced_single_ms(calls=max(3, round(2 * limit_s))), 2),
    }
