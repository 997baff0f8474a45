"""One measured point: the load, what the client saw, and what the server saw (its own
/metrics scraped before and after)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from batchserve.client import BatchserveError
from bench.harness import load, scrape

BATCH_BUCKETS = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "512.0")


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches per size bucket (le) handed to the model during the point."""
    out: dict[str, float] = {}
    previous = 0.0
    for le in BATCH_BUCKETS:
        key = f'batchserve_batch_size_bucket{{le="{le}"}}'
        cumulative = after.get(key, 0.0) - before.get(key, 0.0)
        out[le.removesuffix(".0")] = cumulative - previous
        previous = cumulative
    return {k: v for k, v in out.items() if v}


def measure(
    base_url: str,
    spec: load.LoadSpec,
    processes: int = 1,
    slo_ms: float = 1000.0,
    images_per_request: int = 1,
) -> dict[str, Any]:
    """Run ``spec`` and summarise it; scrapes ``base_url``/metrics when it exists."""
    try:
        before = scrape.scrape(base_url)
    except BatchserveError:
        before = {}
    result = load.run(spec, processes)
    after = scrape.scrape(base_url) if before else {}
    view = scrape.difference(before, after) if before else None
    achieved = result.achieved_per_s()
    point: dict[str, Any] = {
        "mode": "closed" if spec.concurrency else "open",
        "offered_per_s": spec.rate if not spec.concurrency else None,
        "concurrency": spec.concurrency or None,
        "requests": len(result.measured()),
        "achieved_per_s": round(achieved, 1),
        "images_per_s": round(achieved * images_per_request, 1),
        "goodput_per_s": round(result.goodput_per_s(slo_ms / 1000.0), 1),
        "slo_ms": slo_ms,
        "p50_ms": round(result.percentile_ms(50), 1),
        "p90_ms": round(result.percentile_ms(90), 1),
        "p99_ms": round(result.percentile_ms(99), 1),
        "p999_ms": round(result.percentile_ms(99.9), 1),
        "errors": result.errors(),
    }
    if view is not None:
        point["server"] = {
            "mean_batch_size": round(view.mean_batch_size, 2),
            "batch_sizes": batch_distribution(before, after),
            "mean_queue_wait_ms": round(view.mean_queue_wait_ms, 2),
            "mean_inference_ms": round(view.mean_inference_ms, 2),
            "mean_search_ms": round(view.mean_search_ms, 2),
            "mean_decode_ms": round(view.mean_decode_ms, 2),
            "mean_request_ms": round(view.mean_request_ms, 2),
        }
    return point


def sweep(
    base_url: str,
    spec: load.LoadSpec,
    values: list[float],
    processes: int = 1,
    slo_ms: float = 1000.0,
    images_per_request: int = 1,
) -> list[dict[str, Any]]:
    """One point per rate (open loop) or per concurrency (closed loop)."""
    points = []
    for value in values:
        one = (
            replace(spec, concurrency=int(value))
            if spec.concurrency
            else replace(spec, rate=float(value))
        )
        points.append(measure(base_url, one, processes, slo_ms, images_per_request))
    return points
