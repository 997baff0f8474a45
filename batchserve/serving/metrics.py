"""Every Prometheus metric batchserve exports, in one registry owned by one object.

Names are stable (see DESIGN.md); units are base units (seconds, bytes, totals). Beside
batchserve's own, the registry holds the process's (``process_*``: memory, CPU, open files),
the interpreter's (``python_info``) and its garbage collector's (``python_gc_*``). No
``*_created`` series are exported. The dashboard and the alert rules that read these names
are in deploy/grafana/ and deploy/prometheus/.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_WAIT_BUCKETS_S = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The registry and its metrics; implements BatchObserver and InferenceObserver."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "batchserve_requests",
            "HTTP requests by route and status code",
            ["route", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "batchserve_request_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_items = Gauge(
            "batchserve_queue_items", "Images waiting for the model", registry=r
        )
        self.queue_wait_seconds = Histogram(
            "batchserve_queue_wait_seconds",
            "Time an image waited in the queue for its batch",
            buckets=_WAIT_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "batchserve_batch_size",
            "Images per batch handed to the model (before padding)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "batchserve_inference_seconds",
            "Model time per batch, by padded batch size",
            ["batch_size"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "batchserve_decode_seconds",
            "Time to decode and resize one image",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.rejected = Counter(
            "batchserve_rejected",
            "Images refused or dropped, by reason (queue_full, deadline, cancelled, not_ready)",
            ["reason"],
            registry=r,
        )
        self.refusals_held = Counter(
            "batchserve_refusals_held",
            "503s answered late because refusals came faster than --refusals-per-image allows "
            "(clients retrying at once)",
            registry=r,
        )
        self.model_info = Info("batchserve_model", "The model being served", registry=r)
        self.search_seconds = Histogram(
            "batchserve_search_seconds",
            "Index time per batch of searches (one FAISS call per distinct filter)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.index_items = Gauge("batchserve_index_items", "Items in the index", registry=r)
        self.batch_edges_count = Histogram(
            "batchserve_batch_edges",
            "Edge processes whose images one batch held (--workers; one batch mixes them all)",
            buckets=_BATCH_BUCKETS[:7],
            registry=r,
        )
        self.queue_capacity_items = Gauge(
            "batchserve_queue_capacity_items",
            "Images the queue holds before requests get 503 (the max_queue setting)",
            registry=r,
        )
        self.catalog_behind = Gauge(
            "batchserve_catalog_behind_changes",
            "Changes in the shared catalog not yet applied to this replica's index",
            registry=r,
        )
        self.readiness = Gauge(
            "batchserve_ready",
            "1 while the server would answer /readyz with 200 (model and index up), else 0",
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._exported = _WithoutCreated(r)

    # BatchObserver
    def queue_size(self, items: int) -> None:
        self.queue_items.set(items)

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for wait in waits_s:
            self.queue_wait_seconds.observe(wait)

    def item_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def refusal_held(self) -> None:
        self.refusals_held.inc()

    # InferenceObserver (called on the inference thread; prometheus_client is thread-safe)
    def inference_done(self, padded_size: int, seconds: float) -> None:
        self.inference_seconds.labels(str(padded_size)).observe(seconds)

    # StoreObserver (called on the store thread)
    def search_done(self, seconds: float) -> None:
        self.search_seconds.observe(seconds)

    def batch_edges(self, edges: int) -> None:
        self.batch_edges_count.observe(edges)

    def index_size(self, items: int) -> None:
        self.index_items.set(items)

    def request_done(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def decoded(self, seconds: float) -> None:
        self.decode_seconds.observe(seconds)

    def set_model(self, name: str, source: str, dim: int, pretrained: bool) -> None:
        self.model_info.info(
            {"name": name, "source": source, "dim": str(dim), "pretrained": str(pretrained)}
        )

    def catalog_lag(self, changes: int) -> None:
        """How far this replica's index is behind the shared catalog."""
        self.catalog_behind.set(changes)

    def set_queue_capacity(self, items: int) -> None:
        """The most images the queue holds (``BatchPolicy.max_queue``)."""
        self.queue_capacity_items.set(items)

    def track_readiness(self, ready: Callable[[], bool]) -> None:
        """Export ``ready()`` (the /readyz condition), read at every scrape, as
        ``batchserve_ready``; until this is called it reads 0."""
        self.readiness.set_function(lambda: 1.0 if ready() else 0.0)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self._exported)


class _WithoutCreated(Collector):
    """``registry``'s metrics without their ``*_created`` samples. prometheus_client adds
    one to every counter and histogram, and to each of their labelled children: in the text
    format each is a gauge series of its own that nothing here reads (neither the dashboard
    nor the alerts). Filtering here, rather than with prometheus_client's
    ``disable_created_metrics()``, leaves the library's process-wide switch alone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            kept = copy.copy(family)
            kept.samples = [s for s in family.samples if s.name != created]
            yield kept


class MetricsPage(Resource):
    """``/metrics`` alone, for a separate metrics address (``metrics_address``)."""

    isLeaf = True  # noqa: N815 (Twisted API)

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:  # noqa: N802 (Twisted API)
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"only /metrics is served here\n"
        request.setHeader(b"Content-Type", self._metrics.content_type.encode())
        return self._metrics.render()
