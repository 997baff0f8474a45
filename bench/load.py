"""Closed-loop load: N clients, each sending its next request as soon as the previous one
is answered, over keep-alive connections, with bodies encoded once up front."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class Sample:
    started_s: float
    latency_s: float
    status: int


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    images_per_request: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    @property
    def errors(self) -> dict[int, int]:
        return dict(Counter(s.status for s in self.samples if s.status != 200))

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.duration_s

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def percentile_ms(self, q: float) -> float:
        latencies = [s.latency_s for s in self.ok]
        return 1000.0 * float(np.percentile(latencies, q)) if latencies else float("nan")


def closed_loop(
    url: str,
    bodies: list[bytes],
    content_type: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 2.0,
    images_per_request: int = 1,
) -> LoadResult:
    """Run ``concurrency`` clients against ``url`` for ``warmup_s`` + ``duration_s``;
    only requests started inside the measurement window count."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    result = LoadResult(concurrency, duration_s, images_per_request)
    lock = threading.Lock()

    def client(index: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        i = index
        mine: list[Sample] = []
        while True:
            sent = time.perf_counter()
            if sent >= window[1]:
                break
            body = bodies[i % len(bodies)]
            i += concurrency
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
                status = 0
            done = time.perf_counter()
            if sent >= window[0]:
                mine.append(Sample(sent, done - sent, status))
        conn.close()
        with lock:
            result.samples.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result
