"""Replicas on one machine (deploy/local-cluster: PostgreSQL, replicas, nginx, all on
127.0.0.1): how long a write through one replica takes to be visible on another, under a
steady write stream; and search throughput through nginx with 1 and with 2 replicas. On a
2-core machine the replicas share the cores, so the second figure shows what nginx and a
second process cost, not what a second machine would add."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batchserve.client import Client
from bench.harness import images as bench_images
from bench.harness import load, point
from bench.harness.bodies import build_requests
from bench.harness.procs import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-cluster"
WRITES = 60
WRITE_RATE = 5.0  # writes/s: a steady stream, not a saturating one
#: Seconds of searches through nginx around a rolling restart of two replicas (each
#: restart waits for its replica to be ready again: the model's load, ~7 s here).
RESTART_LOAD_S = 45.0


def _script(*args: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
    subprocess.run([str(SCRIPT), *args], check=True, capture_output=True, timeout=600, env=environ)


class _Cluster:
    def __init__(self, replicas: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="batchserve-bench-cluster-"))
        self.root.chmod(0o755)  # PostgreSQL and nginx's workers run as their own users
        self.directory = self.root / "cluster"
        self.port = free_port()
        self.replicas = replicas

    def __enter__(self) -> _Cluster:
        _script("start", "-n", str(self.replicas), "--dir", str(self.directory),
                "--port", str(self.port), "--", "--no-demo")  # fmt: skip
        return self

    def __exit__(self, *_: object) -> None:
        _script("stop", "--dir", str(self.directory))
        shutil.rmtree(self.root, ignore_errors=True)

    def replica_url(self, i: int) -> str:
        port = (self.directory / "run" / f"replica-{i}.port").read_text().strip()
        return f"http://127.0.0.1:{port}"


def convergence_ms(cluster: _Cluster, photo: bytes) -> list[float]:
    """Write through replica 1 at WRITE_RATE; the time until replica 2 reads each write."""
    delays = []
    with Client(cluster.replica_url(1)) as one, Client(cluster.replica_url(2)) as two:
        for n in range(WRITES):
            started = time.perf_counter()
            one.add(id=f"converge-{n}", image=photo)
            acknowledged = time.perf_counter()
            while not _present(two, f"converge-{n}"):
                time.sleep(0.002)
            delays.append((time.perf_counter() - acknowledged) * 1000.0)
            time.sleep(max(0.0, 1.0 / WRITE_RATE - (time.perf_counter() - started)))
    return delays


def _present(client: Client, item_id: str) -> bool:
    from batchserve.client import NotFound

    try:
        client.get(item_id)
    except NotFound:
        return False
    return True


def search_through_nginx(cluster: _Cluster, images: list[bytes], seconds: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{cluster.port}"
    with Client(cluster.replica_url(1)) as client:
        for i, image in enumerate(images[:8]):
            client.add(id=f"catalog-{i}", image=image)
    return point.measure(base, _searches(base, images, seconds, clients=32, warmup_s=3.0))


def _searches(
    base: str, images: list[bytes], seconds: float, clients: int, warmup_s: float
) -> load.LoadSpec:
    """``clients`` closed-loop clients searching by ``images`` through ``base``."""
    return load.LoadSpec(
        url=base + "/v1/search?k=10",
        requests=build_requests(base, "/v1/search?k=10", images),
        duration_s=seconds,
        warmup_s=warmup_s,
        concurrency=clients,
        timeout_s=30.0,
    )


def restart_under_load(cluster: _Cluster, images: list[bytes]) -> dict[str, Any]:
    """``deploy/local-cluster restart`` (the replicas one by one) while 8 clients search
    through nginx without pause: what the clients saw, every status counted."""
    base = f"http://127.0.0.1:{cluster.port}"
    spec = _searches(base, images, RESTART_LOAD_S, clients=8, warmup_s=0.0)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(load.run, spec)
        time.sleep(3.0)
        started = time.perf_counter()
        _script("restart", "--dir", str(cluster.directory))
        restart_s = time.perf_counter() - started
        result = running.result()
    statuses = Counter(s.status for s in result.measured())
    return {
        "requests": sum(statuses.values()),
        "failed": sum(n for status, n in statuses.items() if status != 200),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "restart_s": round(restart_s, 1),
        "load_s": RESTART_LOAD_S,
    }


def measure(seconds: float) -> dict[str, Any]:
    images = bench_images.sample_photos()
    with _Cluster(2) as two:
        delays = convergence_ms(two, images[0])
        searched_two = search_through_nginx(two, images, seconds)
        restarted = restart_under_load(two, images)
    with _Cluster(1) as one:
        searched_one = search_through_nginx(one, images, seconds)
    cuts = statistics.quantiles(delays, n=100, method="inclusive")
    return {
        "writes": WRITES,
        "write_rate": WRITE_RATE,
        "convergence_p50_ms": round(statistics.median(delays), 1),
        "convergence_p99_ms": round(cuts[98], 1),
        "convergence_max_ms": round(max(delays), 1),
        "search": {
            "1": {k: searched_one[k] for k in ("images_per_s", "p50_ms", "p99_ms", "errors")},
            "2": {k: searched_two[k] for k in ("images_per_s", "p50_ms", "p99_ms", "errors")},
        },
        "clients": 32,
        "seconds": seconds,
        "restart": restarted,
    }
