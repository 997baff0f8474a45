"""The edge's end of the control channel, and what the edge's service runs on through it.

An edge process serves the HTTP API with the same ``ImageService`` as a single process,
built on these instead of the local Batcher, model and store thread:

- ``CoreLink``: the channel to the core. It mirrors the core's status (readiness, the
  index's state, the queue), told at once when it changes and with every answer.
- ``EdgeQueue``: admission against the mirrored queue (so a full core is refused from the
  headers, 503 with Retry-After, before the body is read); decoded images copied into this
  edge's shared slots on the decode thread; a request's jobs sent as slot numbers, and its
  slots freed once the core has answered for them (also after a cancel: until its answer
  the core may be reading them).
- ``CoreModel`` and ``CoreStore``: the model's and the store thread's state as mirrored;
  store calls asked of the core by name.
- ``MetricsRelay``: what this edge's requests count (requests, decode times, refusals)
  sent to the core's registry every ``flush_s``, so one ``/metrics`` counts every edge, and
  a restarted edge's counts are not lost; ``/metrics`` here asks the core for its page.

Reactor thread, except ``EdgeQueue.stage`` and ``MetricsRelay.decoded`` (decode threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from batchserve.errors import NotReady, Overloaded
from batchserve.models.spec import ModelInfo
from batchserve.serving.batching import BatchPolicy
from batchserve.serving.metrics import Metrics
from batchserve.serving.pipeline import Job, Outcome
from batchserve.serving.slots import Partition
from batchserve.storage.outage import CatalogHealth
from batchserve.workers.core import CoreStatus, WireJob
from batchserve.workers.frames import ChannelProtocol

T = TypeVar("T")


class CoreLink(ChannelProtocol):
    """The edge's end of its channel to the core. ``status`` is the core's, as last told;
    ``on_lost`` runs when the channel closes (the core went away)."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        super().__init__()
        self._on_lost = on_lost
        self.status: CoreStatus | None = None
        self.info: ModelInfo | None = None
        #: Sends what this edge counted to the core (``MetricsRelay.flush``).
        self.flush_metrics: Callable[[], None] = lambda: None

    def answer(self, name: str, body: Any) -> Any:
        if name == "flush":  # a metrics page is wanted: send the counts first
            self.flush_metrics()
            return None
        raise NotImplementedError(name)

    def heard(self, name: str, body: Any) -> None:
        if name == "status":
            self.status = body

    def hello(self, edge: int) -> Deferred[Any]:
        """Introduce this edge; fires with the core's model info, settings and status."""

        def greeted(answer: dict[str, Any]) -> dict[str, Any]:
            self.info, self.status = answer["info"], answer["status"]
            return answer

        return self.ask("hello", edge).addCallback(greeted)

    def lost(self) -> None:
        self._on_lost()


class EdgeQueue:
    """The core's queue, seen from an edge (a service's ``JobQueue``)."""

    def __init__(
        self,
        link: CoreLink,
        slots: Partition,
        policy: BatchPolicy,
        rejected: Callable[[str], None],
    ) -> None:
        self._link = link
        self._slots = slots
        self._policy = policy
        self._rejected = rejected
        #: The slots of each staged job's views, by its image's slot.
        self._views: dict[int, list[Any]] = {}

    @property
    def timeout_s(self) -> float:
        return self._policy.timeout_s

    def check_room(self, items: int, pending: int = 0, timeout_s: float | None = None) -> None:
        status = self._link.status
        if status is None or self._link.closed:
            raise NotReady("the model core is not reachable; retry shortly")
        reason = status.queue.refusal(self._policy, items, pending, timeout_s)
        if reason is not None:
            self._rejected("queue_full")
            raise Overloaded(
                f"{reason}; retry later", retry_after_s=status.queue.retry_after_s(self._policy)
            )

    def count_rejection(self, reason: str) -> None:
        self._rejected(reason)

    def images_per_s(self) -> float:
        status = self._link.status
        return 0.0 if status is None else status.queue.images_per_s(self._policy)

    def stage(self, jobs: list[Job]) -> list[Job]:
        """On a decode thread: each job's images copied into this edge's shared slots."""
        staged: list[Job] = []
        try:
            for job in jobs:
                pictures = [job.image] if job.views is None else [job.image, *job.views]
                image, *views = self._slots.put(pictures)
                if views:
                    self._views[self._slot(image)] = views
                staged.append(Job(image, job.task, part=job.part))
        except Exception:
            self.discard(staged)  # e.g. this edge's slots are all taken: the request takes none
            raise
        return staged

    def _slot(self, image: Any) -> int:
        slot = self._slots.ring.slot_of(image)
        assert slot is not None, "a staged image is in a slot"
        return slot

    def discard(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._slots.give_back([job.image, *self._views.pop(self._slot(job.image), [])])

    def submit_jobs(self, jobs: Sequence[Job], timeout_s: float) -> Deferred[list[Outcome]]:
        wire: list[WireJob] = []
        for job in jobs:
            slot = self._slot(job.image)
            views = tuple(self._slot(v) for v in self._views.get(slot, []))
            wire.append((slot, views, job.task))
        d = self._link.ask("submit", (timeout_s, wire), settled=lambda: self.discard(jobs))

        def answered(answer: tuple[list[Outcome], Any]) -> list[Outcome]:
            outcomes, queue = answer
            if self._link.status is not None:
                self._link.status = replace(self._link.status, queue=queue)
            return outcomes

        return d.addCallback(answered)


class CoreModel:
    """The core's model as an edge's service sees it (``ModelStatus``)."""

    def __init__(self, link: CoreLink) -> None:
        self._link = link

    @property
    def info(self) -> ModelInfo | None:
        return self._link.info if not self._link.closed else None

    @property
    def ready(self) -> bool:
        """The core ready: its model warm and index open, and every edge serving."""
        status = self._link.status
        return status is not None and status.ready and not self._link.closed


class CoreStore:
    """The core's store thread as an edge's service sees it (``ItemStoreThread``)."""

    def __init__(self, link: CoreLink) -> None:
        self._link = link

    @property
    def ready(self) -> bool:
        status = self._link.status
        return status is not None and status.store_ready and not self._link.closed

    @property
    def rebuilding(self) -> bool:
        status = self._link.status
        return status is not None and status.rebuilding

    @property
    def catalog_health(self) -> CatalogHealth | None:
        status = self._link.status
        return None if status is None else status.catalog_health

    def call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if not self.ready:
            return fail(NotReady("the index is loading; retry shortly"))
        return self._link.ask("store", (fn.__name__, args))


class MetricsRelay:
    """An edge's metrics: counted in the core's registry (see the module's docstring)."""

    content_type = Metrics.content_type

    def __init__(self, link: CoreLink, clock: IReactorTime, flush_s: float = 0.5) -> None:
        self._link = link
        self._events: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        self._flushing = LoopingCall(self.flush)
        self._flushing.clock = clock
        self._flush_s = flush_s
        link.flush_metrics = self.flush

    def start(self) -> None:
        self._flushing.start(self._flush_s, now=False)

    def stop(self) -> None:
        if self._flushing.running:
            self._flushing.stop()
        self.flush()

    def flush(self) -> None:
        with self._lock:  # decode threads append while the reactor takes the list
            events, self._events = self._events, []
        if events:
            self._link.tell("observe", events)

    def _count(self, event: tuple[str, tuple[Any, ...]]) -> None:
        with self._lock:
            self._events.append(event)

    def request_done(self, route: str, code: int, seconds: float) -> None:
        self._count(("request_done", (route, code, seconds)))

    def decoded(self, seconds: float) -> None:
        self._count(("decoded", (seconds,)))

    def item_rejected(self, reason: str) -> None:
        self._count(("item_rejected", (reason,)))

    def refusal_held(self) -> None:
        self._count(("refusal_held", ()))

    def render(self) -> Deferred[bytes]:
        """The core's metrics page, with what every edge counted up to now."""
        d: Deferred[bytes] = self._link.ask("metrics")
        return d
