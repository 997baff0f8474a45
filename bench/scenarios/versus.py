"""batchserve against baseline (b), Flask + a compiled ``tf.function`` under gunicorn, side
by side (``python -m bench versus``): both servers up at once, the same closed-loop load on
each in alternating short rounds (A, B, A, B, ...), so that drift of the machine's speed
(thermal, other tenants) hits both alike. Quotes the median of the per-pair throughput
ratios and each side's p99 over all its rounds."""

from __future__ import annotations

import os
import statistics
from typing import Any

from bench.harness import load, procs
from bench.harness.bodies import build_requests

BASELINE = "flask_function"


def one_round(base: str, images: list[bytes], clients: int, seconds: float) -> load.LoadResult:
    requests = build_requests(base, "/v1/embed", images)
    spec = load.LoadSpec(base + "/v1/embed", requests, seconds, warmup_s=2, concurrency=clients)
    return load.run(spec)


def side(results: list[load.LoadResult]) -> dict[str, Any]:
    """One server's rounds: images/s of each, and latency percentiles over all of them."""
    pooled = load.LoadResult(results[0].spec, [s for r in results for s in r.measured()])
    return {
        "images_per_s": [round(r.achieved_per_s(), 1) for r in results],
        "median_images_per_s": round(statistics.median(r.achieved_per_s() for r in results), 1),
        "p50_ms": round(pooled.percentile_ms(50), 1),
        "p99_ms": round(pooled.percentile_ms(99), 1),
        "errors": pooled.errors(),
    }


def ratio_of(a: load.LoadResult, b: load.LoadResult) -> float:
    """Throughput of round ``a`` over that of round ``b``."""
    return a.achieved_per_s() / max(b.achieved_per_s(), 1e-9)


def alternate(
    a_url: str, b_url: str, images: list[bytes], rounds: int, clients: int, seconds: float
) -> dict[str, Any]:
    """``rounds`` pairs of rounds, A then B; the ratio is taken within each pair."""
    a: list[load.LoadResult] = []
    b: list[load.LoadResult] = []
    for _ in range(rounds):
        a.append(one_round(a_url, images, clients, seconds))
        b.append(one_round(b_url, images, clients, seconds))
    ratios = [ratio_of(x, y) for x, y in zip(a, b, strict=True)]
    return {
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "batchserve": side(a),
        "baseline": side(b),
    }


def measure(
    images: list[bytes], rounds: int = 5, clients: int = 32, seconds: float = 10.0
) -> dict[str, Any]:
    """batchserve (default settings) and baseline (b) (a worker per core), both started
    first and both up for the whole comparison."""
    with procs.temporary_server(["--no-demo"], prefix="batchserve-bench-versus-") as running:
        baseline = procs.start_baseline(BASELINE, workers=os.cpu_count() or 2)
        try:
            compared = alternate(running.url, baseline.url, images, rounds, clients, seconds)
        finally:
            baseline.stop()
    return {
        "baseline_name": "(b) Flask + tf.function",
        "rounds": rounds,
        "clients": clients,
        "seconds": seconds,
        "warmup_s": 2,
        **compared,
    }
