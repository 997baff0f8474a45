"""POST /v1/embed on every server of the report (sections 2 to 5 of RESULTS.md): batchserve,
batchserve with batching off, and the two Flask + gunicorn baselines, each alone on the
machine under the same closed- and open-loop points; then batchserve at low load."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bench.harness import load, point, procs
from bench.harness.bodies import build_requests

#: Server name in results.json -> (batchserve flags, or the baseline module).
BATCHSERVE = {"batchserve": [], "batching off": ["--max-batch-size", "1"]}
BASELINES = {
    "(a) Flask + model.predict": "flask_predict",
    "(b) Flask + tf.function": "flask_function",
}
#: Clients (closed loop) at which every server is compared.
COMPARED_AT = 32


@dataclass(frozen=True)
class Plan:
    """The points of one server: client counts (closed loop) and rates (open loop)."""

    duration_s: float
    warmup_s: float
    slo_ms: float
    rates: list[float]
    clients: list[int]


def points(base: str, route: str, images: list[bytes], plan: Plan) -> list[dict[str, Any]]:
    """One point per client count, then one per rate, each on its own measurement window."""
    requests = build_requests(base, route, images)
    specs = [
        load.LoadSpec(base + route, requests, plan.duration_s, plan.warmup_s, concurrency=c)
        for c in plan.clients
    ] + [
        load.LoadSpec(base + route, requests, plan.duration_s, plan.warmup_s, rate=r)
        for r in plan.rates
    ]
    return [point.measure(base, spec, 1, plan.slo_ms) for spec in specs]


def batchserve(flags: list[str], images: list[bytes], plan: Plan) -> dict[str, Any]:
    """The points of one batchserve, its resident memory after them, its start to ready."""
    with procs.temporary_server(["--no-demo", *flags]) as running:
        measured = points(running.url, "/v1/embed", images, plan)
        rss = procs.tree_rss_bytes(running.process.pid)
    return {"points": measured, "rss_mib": round(rss / 2**20), "ready_s": round(running.ready_s, 1)}


def baseline(module: str, images: list[bytes], plan: Plan) -> dict[str, Any]:
    """The points of one baseline (a worker per core) and its tree's resident memory."""
    started = procs.start_baseline(module, workers=os.cpu_count() or 2)
    try:
        measured = points(started.url, "/v1/embed", images, plan)
        rss = procs.tree_rss_bytes(started.process.pid)
    finally:
        started.stop()
    return {"points": measured, "rss_mib": round(rss / 2**20)}


def measure(images: list[bytes], plan: Plan) -> dict[str, Any]:
    """Every server in turn; batching off and the baselines only at ``COMPARED_AT``
    clients closed loop (the comparison point, always measured) besides the rates."""
    clients = sorted({*plan.clients, COMPARED_AT})
    plan = Plan(plan.duration_s, plan.warmup_s, plan.slo_ms, plan.rates, clients)
    at32 = Plan(plan.duration_s, plan.warmup_s, plan.slo_ms, plan.rates, [COMPARED_AT])
    servers: dict[str, Any] = {"batchserve": batchserve(BATCHSERVE["batchserve"], images, plan)}
    servers["batching off"] = batchserve(BATCHSERVE["batching off"], images, at32)
    for name, module in BASELINES.items():
        servers[name] = baseline(module, images, at32)
    return {
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "slo_ms": plan.slo_ms,
        "images": len(images),
        "servers": servers,
    }


def measure_low_load(images: list[bytes], seconds: float, slo_ms: float) -> dict[str, Any]:
    """Open loop at 1 request/s on a fresh batchserve: the p50 and where its time goes."""
    with procs.temporary_server(["--no-demo"]) as running:
        requests = build_requests(running.url, "/v1/embed", images)
        spec = load.LoadSpec(running.url + "/v1/embed", requests, seconds, warmup_s=2, rate=1.0)
        return {"seconds": seconds, "point": point.measure(running.url, spec, 1, slo_ms)}
