"""batchserve against its peers side by side (``python -m bench versus``): baseline (b),
Flask + a compiled ``tf.function`` under gunicorn, and peer (c), BentoML with adaptive
batching around the same function. batchserve runs twice: on TensorFlow, the runtime of
both peers (what batching alone gives), and on OpenVINO (what a user gains by switching).
All up at once, the same closed-loop load on each in turn in short rounds, the order turned
each round, so that drift of the machine's speed (thermal, other tenants) hits all alike.
Quotes the median of the per-round throughput ratios and each side's p99 over all its
rounds."""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import Any

from bench.harness import load, procs
from bench.harness.bodies import build_requests

BASELINE = "flask_function"
BENTOML = "bentoml_service:Embedder"


def one_round(
    base: str, images: list[bytes], clients: int, seconds: float, encoding: str = "raw"
) -> load.LoadResult:
    requests = build_requests(base, "/v1/embed", images, encoding)
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


def rotate(
    urls: dict[str, str],
    images: list[bytes],
    rounds: int,
    clients: int,
    seconds: float,
    pairs: list[tuple[str, str]],
    encodings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``rounds`` rounds, each server loaded in turn within a round, the order turned by
    one each round (the machine's speed drifts within a round: no server keeps the same
    place in it); the ratio of each pair's first server over its second, taken within each
    round. ``encodings``: a server's request bodies, when not raw images."""
    results: dict[str, list[Any]] = {name: [] for name in urls}
    names = list(urls)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            encoding = (encodings or {}).get(name, "raw")
            results[name].append(one_round(urls[name], images, clients, seconds, encoding))
    ratios = {
        f"{a}/{b}": [round(ratio_of(x, y), 3) for x, y in zip(results[a], results[b], strict=True)]
        for a, b in pairs
    }
    return {
        "sides": {name: side(done) for name, done in results.items()},
        "ratios": ratios,
        "median_ratios": {pair: round(statistics.median(r), 3) for pair, r in ratios.items()},
    }


#: The sides of ``measure`` and the pairs it quotes.
PAIRS = [
    ("batchserve", "baseline"),
    ("openvino", "baseline"),
    ("batchserve", "bentoml"),
    ("openvino", "bentoml"),
]


def measure(
    images: list[bytes], rounds: int = 5, clients: int = 32, seconds: float = 10.0
) -> dict[str, Any]:
    """batchserve on TensorFlow and on OpenVINO (otherwise default settings), baseline (b)
    (a worker per core) and BentoML (one worker), all started first and up for the whole
    comparison."""
    with contextlib.ExitStack() as stack:
        urls = {
            "batchserve": stack.enter_context(
                procs.temporary_server(["--no-demo", "--backend", "tensorflow"])
            ).url,
            "openvino": stack.enter_context(
                procs.temporary_server(["--no-demo", "--backend", "openvino"])
            ).url,
        }
        baseline = procs.start_baseline(BASELINE, workers=os.cpu_count() or 2)
        stack.callback(baseline.stop)
        bentoml = procs.start_bentoml(BENTOML)
        stack.callback(bentoml.stop)
        urls.update(baseline=baseline.url, bentoml=bentoml.url)
        compared = rotate(
            urls, images, rounds, clients, seconds, PAIRS, encodings={"bentoml": "multipart"}
        )
    sides = compared["sides"]
    return {
        "baseline_name": "(b) Flask + tf.function",
        "peer_name": "(c) BentoML 1.4, adaptive batching, tf.function",
        "rounds": rounds,
        "clients": clients,
        "seconds": seconds,
        "warmup_s": 2,
        "ratios": compared["ratios"]["batchserve/baseline"],
        "median_ratio": compared["median_ratios"]["batchserve/baseline"],
        "batchserve": sides["batchserve"],
        "baseline": sides["baseline"],
        "sides": sides,
        "ratios_by_pair": compared["ratios"],
        "median_ratios": compared["median_ratios"],
    }
