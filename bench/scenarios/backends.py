"""The model's backends side by side (``python -m bench backends``): on each, the model
alone at batch 1 and 32 and the offline limit (decode + embed, no HTTP); then a server on
each and baseline (b), Flask + a compiled ``tf.function`` (what users run today), all up at
once and loaded in turn, round after round, at 32 clients. Ratios are taken within each
round and the median quoted."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Any

from batchserve.models.spec import BACKENDS
from bench.harness import procs
from bench.scenarios import offline, versus


def offline_figures(images: list[bytes], backend: str, seconds: float) -> dict[str, Any]:
    """``offline_here`` in a process of its own: Keras runs one backend per process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        figures: dict[str, Any] = pool.apply(offline_here, (images, backend, seconds))
    return figures


def offline_here(images: list[bytes], backend: str, seconds: float) -> dict[str, Any]:
    """The model alone and the limit on ``backend`` (the limit: the better of one and two
    decode threads ahead of the model)."""
    args: dict[str, object] = {"backend": backend}
    _name, rates = offline.model_rates([1, 32], seconds=0.4 * seconds, model_args=args)
    limits = [
        offline.limit_rate(images, decode_threads=n, seconds=seconds, model_args=args)
        for n in (1, 2)
    ]
    return {
        "batch_images_per_s": {str(size): round(rate, 1) for size, rate in rates.items()},
        "limit_per_s": round(max(limits), 1),
    }


def measure(
    images: list[bytes],
    rounds: int = 5,
    clients: int = 32,
    seconds: float = 10.0,
    offline_s: float = 10.0,
) -> dict[str, Any]:
    """Each backend offline, then the servers side by side: OpenVINO's first, so that the
    ratios read as OpenVINO over TensorFlow; and each backend over the baseline."""
    ordered = sorted(BACKENDS, key=lambda b: b != "openvino")
    offline_numbers = {b: offline_figures(images, b, offline_s) for b in ordered}
    with contextlib.ExitStack() as stack:
        urls = {
            b: stack.enter_context(
                procs.temporary_server(["--no-demo", "--backend", b], prefix=f"batchserve-{b}-")
            ).url
            for b in ordered
        }
        baseline = procs.start_baseline(versus.BASELINE, workers=os.cpu_count() or 2)
        stack.callback(baseline.stop)
        pairs = [(b, "flask") for b in ordered] + [("openvino", "tensorflow")]
        compared = versus.rotate(
            {**urls, "flask": baseline.url}, images, rounds, clients, seconds, pairs
        )
    return {
        "baseline_name": "(b) Flask + tf.function",
        "rounds": rounds,
        "clients": clients,
        "seconds": seconds,
        "offline": offline_numbers,
        **compared,
    }
