"""What a verified search costs on the real server (``python -m bench retrieval``): p50 and
p99 of ``POST /v1/search?k=10`` at one client with ``verify=true`` and without, and the
images/s at 32 clients, in alternating rounds on one server (the default settings: the
embedding's top ``verify_k`` verified).

The server holds the quick retrieval benchmark's catalog (its photos, scenes, crops and
distractors, each with its local features), so that every verified search has a full
shortlist; the queries are the benchmark's edited copies."""

from __future__ import annotations

import io
import statistics
import tempfile
from pathlib import Path
from typing import Any

from batchserve.models.verification import VerifyPolicy
from bench.harness import load, point, procs
from bench.harness.bodies import build_requests
from bench.scenarios.retrieval_data import QUICK_EDITS, build

PLAIN, VERIFIED = "/v1/search?k=10", "/v1/search?k=10&verify=true"


def _jpeg(image: Any) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def _fill(url: str, catalog: list[tuple[str, bytes]]) -> None:
    from batchserve.client import Client, NewItem

    with Client(url, timeout_s=120) as client:
        client.add([NewItem(name, data) for name, data in catalog])


def _round(url: str, route: str, queries: list[bytes], clients: int, seconds: float) -> Any:
    requests = build_requests(url, route, queries)
    spec = load.LoadSpec(
        url + route, requests, duration_s=seconds, warmup_s=1.0, concurrency=clients
    )
    return point.measure(url, spec, 1, slo_ms=10_000.0)


def measure(rounds: int = 3, seconds: float = 8.0, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per route: the median over ``rounds`` of p50, p99 (1 client) and images/s (32), on
    a server started with ``flags`` besides the defaults."""
    bench = build(scenes=12, distractor_scenes=150, edits=QUICK_EDITS, real=8)
    catalog = [(p.name, _jpeg(p.image)) for p in bench.catalog]
    queries = [_jpeg(q.image) for q in bench.queries[:64]]
    figures: dict[str, dict[str, list[float]]] = {
        route: {"p50_ms": [], "p99_ms": [], "images_per_s": []} for route in (PLAIN, VERIFIED)
    }
    with tempfile.TemporaryDirectory(prefix="batchserve-verify-") as directory:
        server = procs.ServerProcess.start(Path(directory), ["--no-demo", *flags])
        try:
            _fill(server.url, catalog)
            for _ in range(rounds):
                for route in (PLAIN, VERIFIED):
                    one = _round(server.url, route, queries, 1, seconds)
                    many = _round(server.url, route, queries, 32, seconds)
                    figures[route]["p50_ms"].append(one["p50_ms"])
                    figures[route]["p99_ms"].append(one["p99_ms"])
                    figures[route]["images_per_s"].append(many["images_per_s"])
        finally:
            server.stop()
    medians = {
        "verified" if route == VERIFIED else "unverified": {
            name: round(statistics.median(values), 1) for name, values in by_name.items()
        }
        for route, by_name in figures.items()
    }
    plain, checked = medians["unverified"], medians["verified"]
    return {
        "items": len(catalog),
        "rounds": rounds,
        "verify_k": VerifyPolicy().verify_k,
        **medians,
        "p50_ratio": round(checked["p50_ms"] / plain["p50_ms"], 2),
        "throughput_ratio": round(checked["images_per_s"] / plain["images_per_s"], 2),
    }
