"""Reading the server's own view of a run from its Prometheus /metrics text."""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchserve.client import Client

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(base_url: str) -> dict[str, float]:
    """Every sample of ``base_url``/metrics, keyed by name plus labels as printed. Raises
    ``batchserve.client.BatchserveError`` when there is none (a baseline without /metrics,
    a server that is gone)."""
    with Client(base_url, timeout_s=10.0) as client:
        text = client.metrics()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found:
            samples[found.group(1) + (found.group(2) or "")] = float(found.group(3))
    return samples


@dataclass(frozen=True)
class ServerView:
    """What the server saw between two scrapes."""

    batches: float
    images: float
    queue_wait_s: float
    inference_s: float
    search_batches: float = 0.0
    search_s: float = 0.0
    decoded: float = 0.0
    decode_s: float = 0.0
    requests: float = 0.0
    request_s: float = 0.0

    @property
    def mean_decode_ms(self) -> float:
        """Per image, on the decode pool."""
        return 1000.0 * self.decode_s / self.decoded if self.decoded else 0.0

    @property
    def mean_request_ms(self) -> float:
        """Per request, from its arrival in the handler to its response."""
        return 1000.0 * self.request_s / self.requests if self.requests else 0.0

    @property
    def mean_search_ms(self) -> float:
        return 1000.0 * self.search_s / self.search_batches if self.search_batches else 0.0

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    @property
    def mean_queue_wait_ms(self) -> float:
        return 1000.0 * self.queue_wait_s / self.images if self.images else 0.0

    @property
    def mean_inference_ms(self) -> float:
        return 1000.0 * self.inference_s / self.batches if self.batches else 0.0


def difference(before: dict[str, float], after: dict[str, float]) -> ServerView:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def delta_sum(prefix: str) -> float:
        keys = {k for k in after if k.startswith(prefix)}
        return sum(after[k] - before.get(k, 0.0) for k in keys)

    return ServerView(
        batches=delta("batchserve_batch_size_count"),
        images=delta("batchserve_batch_size_sum"),
        queue_wait_s=delta("batchserve_queue_wait_seconds_sum"),
        inference_s=delta_sum("batchserve_inference_seconds_sum"),
        search_batches=delta("batchserve_search_seconds_count"),
        search_s=delta("batchserve_search_seconds_sum"),
        decoded=delta("batchserve_decode_seconds_count"),
        decode_s=delta("batchserve_decode_seconds_sum"),
        requests=delta_sum("batchserve_request_seconds_count"),
        request_s=delta_sum("batchserve_request_seconds_sum"),
    )
