"""The core's end of each edge's control channel: it runs what edges ask on the one
Batcher, model and store, and tells them how things stand.

An edge sends a request's decoded jobs as slot numbers (``submit``); the core reads the
images in place from the shared ring, checks the room for them in its queue (the bound is
the core's, whatever the edges' own guesses), queues them with the request's deadline as
``pipeline.submit_jobs`` does for a request of its own, and answers with the outcomes and
the queue's state. A ``cancel`` from the edge (its client hung up) cancels the request's
images still queued. Reads, deletes and searches by vector run on the store thread
(``store``, by the name of a ``store_calls`` function). What the edge's metrics saw comes
in notices (``observe``) and is counted in the core's registry, the one ``/metrics`` serves.

When an edge's channel closes (the edge died), every request it had sent is cancelled:
nothing of a dead edge's is computed any more, and its slots are free for its successor.

Reactor thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from batchserve.errors import InvalidInput
from batchserve.models.spec import ModelInfo
from batchserve.serving import store_calls
from batchserve.serving.batching import Batcher, QueueState
from batchserve.serving.metrics import Metrics
from batchserve.serving.pipeline import Job, Outcome, StoreWorker, submit_jobs
from batchserve.serving.records import Task
from batchserve.serving.slots import SlotRing
from batchserve.storage.outage import CatalogHealth
from batchserve.workers.frames import ChannelProtocol

log = Logger(namespace="batchserve.workers")

#: The store calls an edge may ask for, by name.
STORE_CALLS: dict[str, Callable[..., Any]] = {
    fn.__name__: fn
    for fn in (
        store_calls.search_vectors,
        store_calls.similar,
        store_calls.get,
        store_calls.delete,
        store_calls.page,
        store_calls.thumbnail,
        store_calls.describe,
        store_calls.local_features,
    )
}

#: What an edge may ask its metrics to count: the observer methods of its side.
OBSERVED = frozenset({"request_done", "decoded", "item_rejected", "refusal_held"})

#: The longest a metrics page waits for an edge's last counts.
FLUSH_WAIT_S = 1.0

#: A job as an edge sends it: the slot of its image, the slots of its views, its task.
WireJob = tuple[int, tuple[int, ...], Task]


@dataclass(frozen=True)
class CoreStatus:
    """How the core stands, as every edge mirrors it: readiness (the service's, as
    /readyz reads it), the index's state, the shared catalog's health, and the queue."""

    ready: bool
    store_ready: bool
    rebuilding: bool
    catalog_health: CatalogHealth | None
    queue: QueueState


class CoreService(Protocol):
    """What the core's end needs of the core's service."""

    @property
    def ready(self) -> bool: ...

    @property
    def info(self) -> ModelInfo | None: ...


@dataclass
class Core:
    """The core's objects an edge's requests run on."""

    batcher: Batcher[Job, Outcome]
    store: StoreWorker
    service: CoreService
    metrics: Metrics
    settings: Any
    #: The shared slots the edges' images are in (set once they are made).
    ring: SlotRing | None = None

    def status(self) -> CoreStatus:
        return CoreStatus(
            self.service.ready,
            self.store.ready,
            self.store.rebuilding,
            self.store.catalog_health,
            self.batcher.state(),
        )


class EdgeChannel(ChannelProtocol):
    """The core's end of one edge's channel."""

    def __init__(self, core: Core, edges: EdgeChannels) -> None:
        super().__init__()
        self._core = core
        self._edges = edges
        self.edge: int | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self._edges.joined(self)

    def lost(self) -> None:
        self._edges.left(self)

    def answer(self, name: str, body: Any) -> Any:
        if name == "submit":
            return self._submit(*body)
        if name == "store":
            return self._store_call(*body)
        if name == "hello":
            self.edge = int(body)
            info = self._core.service.info
            return {"info": info, "settings": self._core.settings, "status": self._edges.status()}
        if name == "metrics":
            return self._edges.metrics_page()
        raise InvalidInput(f"unknown control request {name!r}")

    def heard(self, name: str, body: Any) -> None:
        if name == "serving" and self.edge is not None:  # its port is open
            self._edges.greeted(self.edge)
        elif name == "observe":
            metrics = self._core.metrics
            for method, args in body:
                if method in OBSERVED:
                    getattr(metrics, method)(*args)

    def _submit(self, timeout_s: float, jobs: Sequence[WireJob]) -> Deferred[Any]:
        ring = self._core.ring
        assert ring is not None, "the edges start after the ring is made"
        made = [
            Job(
                ring.image(slot),
                task,
                views=np.stack(ring.images(views)) if views else None,
                origin=-1 if self.edge is None else self.edge,
            )
            for slot, views, task in jobs
        ]
        batcher = self._core.batcher
        # The queue's bound is the core's: each edge only guessed from the last status.
        batcher.check_room(sum(job.images for job in made))
        d = submit_jobs(batcher, made, timeout_s)
        return d.addCallback(lambda outcomes: (outcomes, batcher.state()))

    def _store_call(self, name: str, args: tuple[Any, ...]) -> Deferred[Any]:
        fn = STORE_CALLS.get(name)
        if fn is None:
            raise InvalidInput(f"unknown store call {name!r}")
        return self._core.store.call(fn, *args)


class EdgeChannels(Factory):
    """The core's ends of every edge's channel, and the status they are told: at once when
    it changes, checked every ``interval_s``."""

    noisy = False

    def __init__(
        self, core: Core, clock: IReactorTime, edges: int = 1, interval_s: float = 0.05
    ) -> None:
        self._core = core
        self._edges = edges
        self._greeted: set[int] = set()
        #: Fires once every edge has said hello (the first time).
        self.all_greeted: Deferred[None] = Deferred()
        self.channels: set[EdgeChannel] = set()
        self._last: tuple[Any, ...] | None = None
        self._telling = LoopingCall(self.tell_status)
        self._telling.clock = clock
        self._clock = clock
        self._interval_s = interval_s

    def buildProtocol(self, addr: Any) -> EdgeChannel:  # noqa: N802 (Twisted API)
        return EdgeChannel(self._core, self)

    def start(self) -> None:
        self._telling.start(self._interval_s, now=False)

    def stop(self) -> None:
        if self._telling.running:
            self._telling.stop()

    def joined(self, channel: EdgeChannel) -> None:
        self.channels.add(channel)

    def has_greeted(self, edge: int) -> bool:
        return edge in self._greeted

    def never_served(self, error: Exception) -> None:
        """Starting failed: an edge could not start at all."""
        if not self.all_greeted.called:
            self.all_greeted.errback(error)

    def greeted(self, edge: int) -> None:
        self._greeted.add(edge)
        if len(self._greeted) == self._edges and not self.all_greeted.called:
            self.all_greeted.callback(None)

    def left(self, channel: EdgeChannel) -> None:
        self.channels.discard(channel)
        log.info("edge {edge} disconnected from the core", edge=channel.edge)

    def metrics_page(self) -> Deferred[bytes]:
        """The core's metrics page, once every edge has sent what it counted so far (each
        answers ``flush`` after its counts, on the same channel; an edge that does not
        answer within ``FLUSH_WAIT_S`` is not waited for)."""
        asked = [
            channel.ask("flush").addTimeout(FLUSH_WAIT_S, self._clock) for channel in self.channels
        ]
        done: Deferred[Any] = DeferredList(asked, consumeErrors=True)
        return done.addCallback(lambda _: self._core.metrics.render())

    def status(self) -> CoreStatus:
        """The core's status, ready only once every edge serves (the server is what
        /readyz answers for, on any edge)."""
        status = self._core.status()
        if status.ready and not self.all_greeted.called:
            return replace(status, ready=False)
        return status

    def tell_status(self) -> None:
        """Tell every edge the core's status, if it changed since last told."""
        status = self.status()
        key = (*_without_queue(status), status.queue.queued, status.queue.inflight_items)
        if key == self._last:
            return
        self._last = key
        for channel in self.channels:
            channel.tell("status", status)


def _without_queue(status: CoreStatus) -> tuple[Any, ...]:
    return (
        status.ready,
        status.store_ready,
        status.rebuilding,
        status.catalog_health,
    )
