"""The one place where the server's objects are built and wired, and its lifecycle.

``build(settings, reactor)`` returns a ``Server``; ``start()`` loads the model and the
index, then listens, and fires once the server is ready; ``stop()`` fails /readyz, stops
listening, closes idle connections, answers what it took, stops the model thread and writes
the final snapshot. The CLI runs it under ``twisted.internet.task.react``; tests build the
same graph with fakes in place of the model, the thread pools and the reactor.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorCore,
    IReactorFromThreads,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from batchserve import __version__
from batchserve.config import ServeSettings
from batchserve.http import ports
from batchserve.http.drain import Connections
from batchserve.http.site import make_site
from batchserve.http.v1 import BatchserveAPI
from batchserve.models.batches import Prediction
from batchserve.models.spec import ModelInfo
from batchserve.serving import logs, store_calls
from batchserve.serving.batching import Batch, Batcher
from batchserve.serving.follower import Follower, listen
from batchserve.serving.metrics import Metrics, MetricsPage
from batchserve.serving.pipeline import Job, LocalQueue, Outcome, PipelineRunner, StoreWorker
from batchserve.serving.records import AddTask
from batchserve.serving.service import ImageService
from batchserve.serving.threads import Threads, name_this_thread
from batchserve.storage.data_dir import lock_data_dir, remove_if_untouched
from batchserve.storage.store import IndexState, ItemStore, OpenReport, open_store
from batchserve.workers.core import Core
from batchserve.workers.front import api_and_site
from batchserve.workers.supervisor import EdgeSupervisor, start_edges

log = Logger(namespace="batchserve")


class IServerReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorFromThreads):
    """What the server needs of its reactor: a clock for the Batcher, deadlines and
    snapshots; TCP to listen on; results from the model's, the decode pool's and the store
    thread back on the reactor; start-up and shutdown. The reactor ``react`` runs provides
    them all (unit tests hand in a ``MemoryReactorClock`` with every thread run at once)."""


class ModelWorker(Protocol):
    """The model's thread, as the server drives it (``InferenceWorker``, or a fake)."""

    @property
    def info(self) -> ModelInfo | None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def sizes(self) -> list[int]: ...

    def start(self) -> Deferred[ModelInfo]: ...

    def stop(self, timeout_s: float = 30.0) -> None: ...

    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]: ...


def default_model(
    settings: ServeSettings, reactor: IReactorFromThreads, metrics: Metrics
) -> ModelWorker:
    """The inference thread, loading the model the settings name (TensorFlow on it)."""
    from batchserve.models.loaders import load_model
    from batchserve.models.spec import takes_any_batch_size
    from batchserve.serving.inference import InferenceWorker

    spec = settings.model
    # A model that takes any batch size compiles nothing per size: warming the powers of
    # two touches its allocations without running all of 1..max (28 s on 2 cores, torch).
    return InferenceWorker(
        lambda: load_model(spec),
        reactor,
        settings.batching.padded_batch_sizes(any_size=takes_any_batch_size(spec)),
        warmup=settings.server.warmup,
        observer=metrics,
        warm_sizes=settings.batching.padded_batch_sizes(),
    )


def build(
    settings: ServeSettings,
    reactor: IServerReactor,
    model: ModelWorker | None = None,
    threads: Threads | None = None,
    store: Callable[[ModelInfo], ItemStore] | None = None,
) -> Server:
    """The server for ``settings`` on ``reactor``, not started. ``model``, ``threads`` and
    ``store`` replace the inference thread, the thread pools and the data-dir store."""
    metrics = Metrics()
    worker = model or default_model(settings, reactor, metrics)
    threads = threads or Threads.pools_for(
        reactor, settings.server.decode_thread_count(), settings.server.decode_nice
    )
    make_store = store or partial(open_store, settings.store, settings.index)
    store_worker = StoreWorker(lambda: make_store(_loaded(worker.info)), threads.store, metrics)
    pipeline = PipelineRunner(
        worker, store_worker, lambda: worker.info.classes if worker.info else None, metrics
    )
    batcher = Batcher(pipeline, settings.batching, reactor, observer=metrics)
    service = ImageService(
        LocalQueue(batcher),
        threads.decode,
        worker,
        settings.images,
        reactor,
        store=store_worker,
        observer=metrics,
        turns=threads.turns,
        verify=settings.verify,
    )
    metrics.set_queue_capacity(settings.batching.max_queue)
    metrics.track_readiness(lambda: service.ready)
    api, site = api_and_site(settings, service, metrics, reactor, batcher.images_per_s)
    return Server(
        settings, reactor, metrics, worker, threads, store_worker, batcher, service, api, site
    )


def _tcp_address(port: IListeningPort) -> IPv4Address | IPv6Address:
    address = port.getHost()
    assert isinstance(address, IPv4Address | IPv6Address), "listenTCP listens on an IP address"
    return address


def _beyond_loopback(host: str) -> bool:
    """Whether a server listening on ``host`` (--host) takes connections from other hosts:
    on any address but a loopback one, or a name other than localhost."""
    if host.lower().rstrip(".") == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True


def _loaded(info: ModelInfo | None) -> ModelInfo:
    assert info is not None, "the store opens only after the model is loaded"
    return info


@dataclass
class Server:
    """A built server: every object of the graph, and its lifecycle."""

    settings: ServeSettings
    reactor: IServerReactor
    metrics: Metrics
    model: ModelWorker
    threads: Threads
    #: The store thread (the item store and its index).
    store: StoreWorker
    batcher: Batcher[Job, Outcome]
    service: ImageService
    api: BatchserveAPI
    site: Site

    def __post_init__(self) -> None:
        self.port: IListeningPort | None = None
        self._metrics_port: IListeningPort | None = None
        self._started_s = time.monotonic()
        self._snapshots = LoopingCall(self._snapshot)
        self._snapshots.clock = self.reactor
        self._follower: Follower | None = None
        self._stop_listening: threading.Event | None = None
        #: What the API listens with: its open connections, for the drain to close.
        self.connections = Connections(self.site)
        self._stopping = False
        #: With --workers N: the edge processes that serve the API for this core.
        self.edges: EdgeSupervisor | None = None

    @property
    def address(self) -> IPv4Address | IPv6Address:
        """The address the API listens on once started."""
        if self.edges is not None:
            host, port = self.edges.address()
            return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        assert self.port is not None, "the server is not listening"
        return _tcp_address(self.port)

    def start(self) -> Deferred[None]:
        """Load the model and open the index, then listen; fires once the server is ready
        (after indexing the demo photos on a first start), or fails with why it cannot.

        The API's port opens only once the server is ready: until then a connection is
        refused, which a load balancer retries on another replica at once (nginx does, see
        deploy/nginx/batchserve.conf), where a 503 "not ready" would reach the client. The
        metrics port (``--metrics-address``) opens at once."""
        self._started_s = time.monotonic()
        self.threads.start()
        self._listen_metrics()
        d: Deferred[Any] = self.model.start()
        d.addCallback(self._model_ready)
        d.addCallback(self._index_ready)
        return d

    def _listen(self) -> None:
        settings = self.settings.server
        # Connections wraps the Site's channels; IReactorTCP asks for a ServerFactory of its
        # default protocol type. The kernel holds as many connections not yet accepted as may
        # be open (Twisted's default, 50, resets clients that connect in a burst).
        self.port = self.reactor.listenTCP(
            settings.port,
            self.connections,  # type: ignore[arg-type]
            backlog=settings.max_connections,
            interface=settings.host,
        )
        secured = settings.api_token or settings.write_token
        log.info(
            "batchserve {version} listening on http://{host}:{port}{auth}",
            version=__version__,
            host=self.address.host,
            port=self.address.port,
            auth=" (bearer tokens required)" if secured else "",
        )
        if not secured and _beyond_loopback(settings.host):
            # Docker's images listen on 0.0.0.0 with no token: refusing to start would
            # break them, so say it where the operator looks.
            log.warn(
                "listening on {host}, beyond this host, with no token: anyone who can reach "
                "port {port} can read, add and delete items. Set --api-token (or "
                "BATCHSERVE_API_TOKEN; --write-token for a token of its own for writes), or "
                "--host 127.0.0.1. Until a token is set, a request that names this server by "
                "a name other than localhost gets 421 unless --allowed-hosts lists it",
                host=self.address.host,
                port=self.address.port,
            )

    def _listen_metrics(self) -> None:
        settings = self.settings.server
        if settings.metrics_address:
            host, port = settings.metrics_host_port()
            # The API's Site, for its Server header (no version) and connection limits.
            page = make_site(
                MetricsPage(self.metrics),
                max_body_bytes=0,
                access_log=False,
                limits=settings.connection_limits(),
                clock=self.reactor,
            )
            page.noisy = False
            self._metrics_port = self.reactor.listenTCP(
                port,
                page,  # type: ignore[arg-type]
                interface=host,
            )
            where = _tcp_address(self._metrics_port)
            log.info("metrics on http://{host}:{port}/metrics", host=where.host, port=where.port)

    def _model_ready(self, info: ModelInfo) -> Deferred[OpenReport]:
        self.metrics.set_model(info.name, info.source, info.dim, info.pretrained)
        log.info(
            "model {name} loaded in {s:.1f} s ({dim}-d, input {size}, {device}), "
            "batch sizes {sizes}",
            s=time.monotonic() - self._started_s,
            name=info.name,
            dim=info.dim,
            size="x".join(map(str, info.input_size)),
            device=info.device,
            sizes=self.model.sizes,
        )
        return self.store.start()

    def _index_ready(self, report: OpenReport) -> Deferred[None]:
        for skipped in report.skipped_snapshots:
            log.warn("skipped snapshot {s}", s=skipped)
        self._snapshots.start(self.settings.store.snapshot_interval_s, now=False)
        if self.settings.store.shared_catalog:
            self._follow()
        d: Deferred[Any] = self.store.call(store_calls.describe)
        d.addCallback(self._announce, report)
        return d.addCallback(self._ready)

    def _announce(self, described: IndexState, report: OpenReport) -> Deferred[Any] | None:
        how = (
            "rebuilt from the catalog"
            if report.rebuilt
            else f"snapshot {report.snapshot_seq} + {report.replayed} changes replayed"
        )
        log.info(
            "index open: {size} items in a {kind} index ({how}, {t:.2f} s)",
            size=described.size,
            kind=described.kind_in_use,
            how=how,
            t=report.seconds,
        )
        if self.settings.store.demo and described.size == 0:
            return seed_demo(self.service, self.store)
        return None

    def _follow(self) -> None:
        """Keep the index current with the shared catalog: poll, and listen."""
        from batchserve.storage.listener import ChangeListener

        store = self.settings.store
        self._follower = Follower(self.store, self.reactor, store.follow_interval_s, self.metrics)
        self._follower.start()
        self._stop_listening = listen(ChangeListener(store.catalog), self.reactor, self._follower)

    def _ready(self, _: object) -> Deferred[None] | None:
        if self._stopping:  # told to stop while starting: never opens the API
            return None
        self.service.mark_started()
        if self.settings.server.edge_count():
            return self._start_edges().addCallback(self._ready_now)
        self._listen()
        self._ready_now(None)
        return None

    def _ready_now(self, _: object) -> None:
        log.info("ready in {s:.1f} s", s=time.monotonic() - self._started_s)

    def _start_edges(self) -> Deferred[None]:
        """Open the listening socket and start the edge processes that serve it; fires once
        every edge serves."""
        settings = self.settings
        info = _loaded(self.model.info)
        self.edges = start_edges(
            settings,
            self.reactor,
            Core(
                self.batcher,
                self.store,
                self.service,
                self.metrics,
                settings,
            ),
            info,
        )
        edges = self.edges
        self.metrics.track_readiness(lambda: self.service.ready and edges.serving().called)
        where = self.address
        log.info(
            "batchserve {version} listening on http://{host}:{port} with {n} edge processes",
            version=__version__,
            host=where.host,
            port=where.port,
            n=settings.server.edge_count(),
        )
        return self.edges.serving()

    def _snapshot(self) -> Deferred[Any]:
        d: Deferred[Any] = self.store.call(_take_snapshot)
        return d.addErrback(_snapshot_failed)

    def stop(self) -> Deferred[None]:
        """Drain (up to ``drain_timeout_s``): fail /readyz, stop listening, close idle
        connections, answer the requests taken, each with ``Connection: close`` (see
        batchserve/http/drain.py); then stop the model thread and the pools, write the
        final snapshot."""
        self._stopping = True
        drain_s = self.settings.server.drain_timeout_s
        if self.edges is not None:
            log.info(
                "shutting down: {n} edge processes drain first, each up to {s:g} s",
                n=self.edges.edges,
                s=drain_s,
            )
        else:
            log.info(
                "shutting down: {n} requests in flight, waiting up to {s:g} s",
                n=self.api.in_flight.count,
                s=drain_s,
            )
        if self._snapshots.running:
            self._snapshots.stop()
        if self._follower is not None:
            self._follower.stop()
        if self._stop_listening is not None:
            self._stop_listening.set()
        # All in this turn of the reactor: no connection is accepted between stopping
        # listening and closing the idle ones.
        ports = [p for p in (self.port, self._metrics_port) if p is not None]
        stopping: list[Deferred[Any]] = [maybeDeferred(p.stopListening) for p in ports]
        if self.edges is not None:
            # The edges drain first (each answers what it took); the core then has none.
            stopping.append(self.edges.stop())
        stopped = gatherResults(stopping)
        drained = self.api.in_flight.drain(drain_s, self.reactor, self.connections)
        d: Deferred[Any] = gatherResults([stopped, drained])
        d.addCallback(lambda results: self._drained(results[1]))
        return d.addBoth(self._closed)

    def _drained(self, all_answered: bool) -> Deferred[None]:
        if not all_answered:
            log.warn(
                "{n} requests still in flight after {s:g} s; stopping anyway",
                n=self.api.in_flight.count,
                s=self.settings.server.drain_timeout_s,
            )
        self.model.stop(timeout_s=5.0)
        return self.store.close()

    def _closed(self, result: object) -> None:
        if isinstance(result, Failure):
            log.error("final snapshot failed: {e}", e=result.getErrorMessage())
        self.threads.stop()
        log.info("stopped")


def _take_snapshot(store: ItemStore) -> Path | None:
    return store.snapshot()


def _snapshot_failed(failure: Failure) -> None:
    log.error(
        "index snapshot failed (the previous one is intact): {e}", e=failure.getErrorMessage()
    )


def seed_demo(service: ImageService, store: StoreWorker) -> Deferred[Any]:
    """Index the sample photos on a first start, once (an emptied data dir stays so)."""
    from batchserve.demo import sample_photos

    def add_samples(done: bool) -> Deferred[Any] | None:
        if done:
            return None
        entries = [
            (data, AddTask(item_id, label, {"source": "scikit-image sample data"}))
            for item_id, label, data in sample_photos()
        ]
        d = service.add(lambda: entries)
        d.addCallback(lambda ids: store.call(_mark_seeded, len(ids)))
        d.addCallback(lambda n: log.info("indexed {n} sample photos to search", n=n))
        return d

    seeded: Deferred[bool] = store.call(_seeded)
    return seeded.addCallback(add_samples)


def _seeded(store: ItemStore) -> bool:
    return bool(store.catalog.get_meta("demo_seeded"))


def _mark_seeded(store: ItemStore, count: int) -> int:
    store.catalog.set_meta("demo_seeded", "1")
    return count


def serve(settings: ServeSettings) -> None:
    """Run the server until SIGINT or SIGTERM; exits 1 when it cannot start."""
    from twisted.internet.task import react

    def main(reactor: IServerReactor) -> Deferred[None]:
        server = build(settings, reactor)
        reactor.addSystemEventTrigger("before", "shutdown", server.stop)
        d = server.start()
        d.addCallbacks(lambda _: Deferred(), partial(_cannot_start, reactor))
        return d

    server = settings.server
    ports.check_free(server.host, server.port)  # before anything is loaded or made
    if server.metrics_address:
        ports.check_free(*server.metrics_host_port(), flag="--metrics-address")
    name_this_thread("batchserve")  # the reactor's thread, as top -H and /proc show it
    process = "core" if server.edge_count() else ""
    logs.start_logging(server.log_level, server.log_format, process)
    os.umask(0o077)  # every file the server creates is readable by its own user only
    data_dir = Path(settings.store.data_dir)
    made = not data_dir.exists()
    lock_data_dir(data_dir)
    try:
        react(main)
    except SystemExit as e:
        if e.code and made:
            remove_if_untouched(data_dir)  # a failed first start leaves no empty data dir
        raise


def _cannot_start(reactor: IReactorCore, failure: Failure) -> Failure:
    log.critical("cannot start: {error}", error=failure.getErrorMessage())
    return Failure(SystemExit(1))
