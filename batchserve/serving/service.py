"""The reactor side of a request: admit it (model and index ready, room in the queue), send
its body to the decode pool to be read and decoded, queue each decoded image in the Batcher
as its own job (a request's adds joined, to be stored all or none), and gather the results
in request order. Item reads, deletes and searches by
vector go to the store thread.

Runs on the reactor thread only. What runs on the decode pool is in ``decoding.py``, what
runs on the store thread in ``store_calls.py`` (and the pipeline's ``apply_tasks``). Returns
Deferreds; knows nothing of HTTP: a request's body comes as a function that reads it.
Cancelling a returned Deferred (the client hung up) cancels every image still queued, and
stops the decode pool before the request's next image.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from batchserve.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from batchserve.models.batches import Prediction
from batchserve.models.images import DecodeLimits
from batchserve.models.spec import ModelInfo
from batchserve.models.verification import VerifyPolicy
from batchserve.serving import store_calls, verifying
from batchserve.serving.decoding import (
    DecodeObserver,
    Picture,
    Reader,
    RequestWatch,
    VectorSearch,
    decoded_jobs,
    search_jobs,
)
from batchserve.serving.pipeline import Job, Outcome
from batchserve.serving.records import AddTask, EmbedTask, Label, SearchRequest, SearchTask, Task
from batchserve.serving.threads import PoolRunner
from batchserve.serving.timings import Timings
from batchserve.serving.turns import DecodeTurns
from batchserve.storage.outage import CatalogHealth
from batchserve.storage.records import Item, Match
from batchserve.storage.store import IndexState

T = TypeVar("T")

EMBED = EmbedTask()


class JobQueue(Protocol):
    """Where a request's decoded images go to be run, and what it says of its room: the
    Batcher in this process (``pipeline.LocalQueue``), or the model core's, from an edge
    process (``workers/edge.py``)."""

    @property
    def timeout_s(self) -> float:
        """The server's deadline for a request (seconds), which also caps its own."""
        ...

    def check_room(self, items: int, pending: int = 0, timeout_s: float | None = None) -> None:
        """Raise Overloaded (counted) unless ``items`` more fit (``Batcher.check_room``)."""
        ...

    def count_rejection(self, reason: str) -> None: ...

    def images_per_s(self) -> float:
        """The rate the model takes images when batches are full."""
        ...

    def stage(self, jobs: list[Job]) -> list[Job]:
        """On the decode pool, once a request's images are decoded: the jobs as they will
        be submitted (an edge copies the images into shared memory here)."""
        ...

    def discard(self, jobs: Sequence[Job]) -> None:
        """Staged jobs that will not be submitted (the request failed or hung up first)."""
        ...

    def submit_jobs(self, jobs: Sequence[Job], timeout_s: float) -> Deferred[list[Outcome]]:
        """Run a request's jobs (``pipeline.submit_jobs``): one outcome per job, in order."""
        ...


class ItemStoreThread(Protocol):
    """The store thread, as the service uses it: ``pipeline.StoreWorker`` in this process,
    or the core's, from an edge."""

    @property
    def ready(self) -> bool: ...

    @property
    def rebuilding(self) -> bool: ...

    @property
    def catalog_health(self) -> CatalogHealth | None: ...

    def call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(store, *args)`` (a function of ``store_calls``) on the store thread."""
        ...


class ModelStatus(Protocol):
    """What the service needs to know of the inference worker."""

    @property
    def info(self) -> ModelInfo | None: ...

    @property
    def ready(self) -> bool: ...


@dataclass
class Call:
    """One request's own deadline (seconds; None: the server's, which also caps it) and
    where its time went, filled in as it goes."""

    timeout_s: float | None = None
    timings: Timings = field(default_factory=Timings)
    #: When the service admitted the request (the reactor's clock); its deadline runs from it.
    admitted_s: float = 0.0
    #: Images the request sent through the model, and the largest batch they ran in.
    images: int = 0
    batch_size: int = 0


class ImageService:
    """Embeds, classifies, searches and adds images through the Batcher; reads and deletes
    items on the store thread."""

    def __init__(
        self,
        queue: JobQueue,
        run_in_pool: PoolRunner,
        model: ModelStatus,
        limits: DecodeLimits,
        clock: IReactorTime,
        store: ItemStoreThread | None = None,
        observer: DecodeObserver | None = None,
        turns: DecodeTurns | None = None,
        verify: VerifyPolicy | None = None,
    ) -> None:
        self._queue = queue
        self._verify = verify or VerifyPolicy()
        self._turns = turns
        self._clock = clock
        self._run_in_pool = run_in_pool
        self._model = model
        self._store = store
        self._limits = limits
        self._observer = observer
        self._reading = 0
        self._reserved = 0
        self._started = store is None

    @property
    def info(self) -> ModelInfo | None:
        """The loaded model, or None while it loads."""
        return self._model.info

    @property
    def ready(self) -> bool:
        """Model warm, index loaded, and start-up work (the demo photos) done."""
        return self._started and self._model.ready and (self._store is None or self._store.ready)

    @property
    def index_state(self) -> str:
        """ "rebuilding" while a running replica rebuilds its index from the catalog (behind
        the change log's pruned horizon), else "loading" until it is open, then "ready"."""
        if self._store is not None and self._store.rebuilding:
            return "rebuilding"
        return "ready" if self._store is None or self._store.ready else "loading"

    @property
    def catalog_health(self) -> CatalogHealth | None:
        """With a shared catalog, whether it answers (if not, why; searches and reads by id
        go on from memory meanwhile); None with the embedded catalog or while loading."""
        return None if self._store is None else self._store.catalog_health

    def mark_started(self) -> None:
        """Start-up is over: /readyz may answer 200 once the model and index are up."""
        self._started = True

    @property
    def reading(self) -> int:
        """Requests accepted whose bodies are still being read and decoded."""
        return self._reading + self._reserved

    def loaded(self, needs_index: bool = False) -> ModelInfo:
        """The loaded model; NotReady while it (or, with ``needs_index``, the index) loads."""
        info = self._model.info
        if info is None:
            raise NotReady("the model is loading; retry shortly")
        if needs_index and (self._store is None or not self._store.ready):
            raise NotReady(f"the index is {self.index_state}; retry shortly")
        return info

    def admit(
        self, needs_index: bool = False, reserve: bool = False, timeout_s: float | None = None
    ) -> ModelInfo:
        """The loaded model, if a request for it may start now: NotReady while the model
        (or, with ``needs_index``, the index) loads, Overloaded (counted) when the queue has
        no room for one more image beside the requests still being read. The HTTP layer
        calls it from a request's headers, before its body is in; the service again when
        the body is in; the queue checks the full count once the images are decoded.
        ``reserve``: the request holds its room until ``release``; ``timeout_s``: its own
        deadline, when it set one."""
        info = self.loaded(needs_index)
        self._queue.check_room(1, pending=self.reading, timeout_s=timeout_s)
        if reserve:
            # Admitted from its headers, its body still to come: it holds its room until
            # its handler runs (``release``), so that a burst of requests is not admitted
            # into one free slot and then refused after its images are decoded.
            self._reserved += 1
        return info

    def release(self) -> None:
        """Give back the room ``admit(reserve=True)`` held."""
        self._reserved -= 1

    # -- through the model ----------------------------------------------------------------

    def embed(
        self, read: Reader[Sequence[bytes]], call: Call | None = None
    ) -> Deferred[list[npt.NDArray[np.float32]]]:
        """The embedding of each image ``read()`` returns, in order: float32 [dim]."""
        d = self._through_model(lambda: [(data, EMBED) for data in read()], call)
        return d.addCallback(lambda outcomes: [o.prediction.embedding for o in outcomes])

    def classify(
        self, read: Reader[Sequence[bytes]], top_k: int, call: Call | None = None
    ) -> Deferred[list[list[Label]]]:
        """The ``top_k`` most likely labels of each image, best first."""
        info = self._model.info
        if info is not None and not info.classes:
            return fail(InvalidInput(f"model {info.name} has no classifier head"))
        classes = info.classes if info is not None else []

        def labels(outcomes: list[Outcome]) -> list[list[Label]]:
            return [top_labels(o.prediction, classes or [], top_k) for o in outcomes]

        d = self._through_model(lambda: [(data, EMBED) for data in read()], call)
        return d.addCallback(labels)

    def predict(
        self, read: Reader[Sequence[Picture]], call: Call | None = None
    ) -> Deferred[list[Prediction]]:
        """The model's whole answer (embedding and class probabilities) for each image,
        encoded or already decoded (pixels are resized to the model's input if need be)."""
        d = self._through_model(lambda: [(image, EMBED) for image in read()], call)
        return d.addCallback(lambda outcomes: [o.prediction for o in outcomes])

    def add(
        self, read: Reader[Sequence[tuple[bytes, AddTask]]], call: Call | None = None
    ) -> Deferred[list[str]]:
        """Store each image under its id; fires with the ids, in order, once every row is
        committed. The items of one request are stored atomically: each image (and item
        view) goes through the model on its own, and once the last of them is embedded all
        the request's items are stored in that batch's store stage, in one catalog
        transaction (with the rest of that batch's adds) and one index add. If any image
        fails, is cancelled or passes the deadline, or the store fails, none is stored
        (a deadline that passes while the store commits them fails the request with all
        of them stored)."""
        d = self._through_model(read, call, needs_index=True)
        return d.addCallback(lambda outcomes: [o.added or "" for o in outcomes])

    def search(
        self, read: Reader[SearchRequest], call: Call | None = None
    ) -> Deferred[list[list[Match]]]:
        """The nearest items of each query image or vector, best first; with ``verify``,
        the embedding's shortlist verified by local features (verifying.py)."""
        try:
            info = self.loaded(needs_index=True)
        except NotReady as e:
            return fail(e)
        call = call or Call()
        # Whether the request holds images or vectors is known once it is read: a search by
        # vectors never reaches the model's queue, so only the queue refuses image searches.
        call.admitted_s = self._clock.seconds()
        asked: list[SearchRequest] = []  # the request as read, on the decode pool
        d = self._off_reactor(
            call,
            self._staged,
            search_jobs,
            lambda: self._shortlisted(read(), asked),
            info,
            self._limits,
            self._observer,
        )

        def route(prepared: list[Job] | VectorSearch) -> Deferred[list[list[Match]]]:
            if isinstance(prepared, VectorSearch):
                return self._timed_search(call, prepared)
            outcomes = self._submit_all(prepared, call)
            found = outcomes.addCallback(lambda done: [o.matches or [] for o in done])
            if verifying.wanted(self._verify, asked[0].task):
                request = asked[0]
                return found.addCallback(
                    lambda matches: self._verified(matches, call, request.task.k, request.images)
                )
            return found

        return d.addCallback(route)

    def copies(
        self, read: Reader[Sequence[bytes]], call: Call | None = None
    ) -> Deferred[list[list[Match]]]:
        """Each image's verified copies among the stored items, those that hold more of it
        first (none: an empty list): a verified search of the embedding's top
        ``verify_k``, its verified matches only."""
        task = SearchTask(k=self._verify.verify_k, verify=True)
        d = self.search(lambda: SearchRequest(task, images=list(read())), call)
        return d.addCallback(lambda found: [[m for m in ms if _is_copy(m)] for ms in found])

    def _shortlisted(self, request: SearchRequest, asked: list[SearchRequest]) -> SearchRequest:
        """``request`` (kept in ``asked``) as searched: a verified one asks the index for
        the shortlist it verifies."""
        asked.append(request)
        if not verifying.wanted(self._verify, request.task):
            return request
        if request.vectors is not None:
            raise InvalidInput("verify needs query images: a vector has no local features")
        return dataclasses.replace(request, task=verifying.shortlist(self._verify, request.task))

    def _verified(
        self,
        found: list[list[Match]],
        call: Call,
        k: int,
        images: Sequence[bytes] | None = None,
        item_id: str | None = None,
    ) -> Deferred[list[list[Match]]]:
        """The first ``k`` of ``found`` verified against the query ``images`` or the stored
        item ``item_id``: the matches' local features read on the store thread, the query's
        found and matched on the decode pool."""
        started = time.perf_counter()
        fids = sorted({m.fid for matches in found for m in matches})
        limits, inliers = self._limits, self._verify.copy_min_inliers

        def rerank(stored: tuple[bytes | None, dict[int, bytes]]) -> list[list[Match]]:
            packed, by_fid = stored
            if images is not None:
                queries = verifying.image_queries(images, limits)
            else:
                queries = [verifying.stored_query(packed)]
            return verifying.rerank_all(queries, found, by_fid, k, inliers)

        def timed(verified: list[list[Match]]) -> list[list[Match]]:
            call.timings.verify_s = time.perf_counter() - started
            return verified

        d = self._store_call(store_calls.local_features, fids, item_id)
        verified = d.addCallback(lambda stored: self._run_in_pool(rerank, stored))
        return verified.addCallback(timed)

    def _timed_search(self, call: Call, search: VectorSearch) -> Deferred[list[list[Match]]]:
        started = time.perf_counter()

        def timed(found: list[list[Match]]) -> list[list[Match]]:
            call.timings.search_s = time.perf_counter() - started
            return found

        d = self._store_call(store_calls.search_vectors, search.queries, search.task)
        return d.addCallback(timed)

    def _through_model(
        self,
        read: Reader[Sequence[tuple[Picture, Task]]],
        call: Call | None,
        needs_index: bool = False,
    ) -> Deferred[list[Outcome]]:
        call = call or Call()
        try:
            info = self.admit(needs_index, timeout_s=call.timeout_s)
        except (NotReady, Overloaded) as e:
            return fail(e)
        call.admitted_s = self._clock.seconds()
        d = self._off_reactor(
            call, self._staged, decoded_jobs, read, info, self._limits, self._observer
        )
        return d.addCallback(self._submit_all, call)

    def _deadline_s(self, call: Call) -> float:
        # The deadline runs from admission: time spent reading and decoding counts. It is
        # worked out once the body is read, which may carry the request's own deadline.
        timeout_s = self._queue.timeout_s
        if call.timeout_s is not None:
            timeout_s = min(timeout_s, call.timeout_s)
        return call.admitted_s + timeout_s

    def _staged(self, make: Callable[..., Any], *args: Any) -> Any:
        """On the decode pool: the jobs ``make(*args)`` decodes, staged for the queue."""
        made = make(*args)
        return made if isinstance(made, VectorSearch) else self._queue.stage(made)

    def _off_reactor(self, call: Call, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args, watch)`` on the decode pool, counted as a request being read.
        The watch stops its decoding between images once the request's deadline passes, or
        once the returned Deferred is cancelled (the client hung up)."""
        self._reading += 1
        watch = RequestWatch(self._clock.seconds, lambda: self._deadline_s(call), self._turns)

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn(*args, watch)
            finally:
                call.timings.decode_s = time.perf_counter() - started

        def stopped(failure: Failure) -> Failure:
            if failure.check(DeadlineExceeded):
                for _image in range(watch.dropped):
                    self._queue.count_rejection("deadline")
            return failure

        def done(result: T) -> T:
            self._reading -= 1
            return result

        def settle(result: T | Failure) -> None:
            if d.called:  # cancelled: nobody waits for what the pool made of it
                if isinstance(result, list):
                    self._queue.discard(result)
                return
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        d: Deferred[T] = Deferred(lambda _d: watch.hang_up())
        self._run_in_pool(timed).addBoth(settle)
        return d.addErrback(stopped).addBoth(done)

    def _submit_all(self, jobs: Sequence[Job], call: Call) -> Deferred[list[Outcome]]:
        left_s = self._deadline_s(call) - self._clock.seconds()
        if left_s <= 0:
            for _job in jobs:
                self._queue.count_rejection("deadline")
            self._queue.discard(jobs)
            return fail(DeadlineExceeded("deadline passed while the images were decoded"))
        try:
            # All of a request's images (item views included) fit in the queue, or none is.
            self._queue.check_room(sum(job.images for job in jobs), pending=self.reading)
        except (Overloaded, NotReady) as e:
            self._queue.discard(jobs)
            return fail(e)
        submitted = time.perf_counter()

        def timed(outcomes: list[Outcome]) -> list[Outcome]:
            call.images, call.batch_size = len(outcomes), max(o.batch_size for o in outcomes)
            call.timings.through_pipeline(
                time.perf_counter() - submitted,
                max(o.model_s for o in outcomes),
                max(o.search_s for o in outcomes),
            )
            return outcomes

        return self._queue.submit_jobs(jobs, left_s).addCallback(timed)

    # -- on the store thread ---------------------------------------------------------------

    def _store_call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            self.loaded(needs_index=True)
        except NotReady as e:
            return fail(e)
        assert self._store is not None
        return self._store.call(fn, *args)

    def similar(self, item_id: str, task: SearchTask) -> Deferred[list[Match]]:
        """The nearest items of a stored item, itself excluded; verified against its stored
        local features when ``task`` (or the server's default) says."""
        if not verifying.wanted(self._verify, task):
            return self._store_call(store_calls.similar, item_id, task)
        d = self._store_call(store_calls.similar, item_id, verifying.shortlist(self._verify, task))
        verified = d.addCallback(
            lambda found: self._verified([found], Call(), task.k, item_id=item_id)
        )
        return verified.addCallback(lambda per_query: per_query[0])

    def get(self, item_id: str) -> Deferred[Item]:
        return self._store_call(store_calls.get, item_id)

    def delete(self, item_id: str) -> Deferred[bool]:
        return self._store_call(store_calls.delete, item_id)

    def page(self, limit: int, before: int | None) -> Deferred[list[Item]]:
        """Up to ``limit`` items, newest first, older than row ``before``."""
        return self._store_call(store_calls.page, limit, before)

    def thumbnail(self, item_id: str) -> Deferred[tuple[int, bytes | None]]:
        """(the item's row, its thumbnail JPEG or None); NotFound when there is no item."""
        return self._store_call(store_calls.thumbnail, item_id)

    def index_info(self) -> Deferred[IndexState]:
        return self._store_call(store_calls.describe)


def _is_copy(match: Match) -> bool:
    return match.verification is not None and match.verification.verified is True


def top_labels(prediction: Prediction, classes: Sequence[str], top_k: int) -> list[Label]:
    """The ``top_k`` classes of ``prediction`` by probability, best first."""
    probabilities = prediction.probabilities
    if probabilities is None:
        raise InvalidInput("the model has no classifier head")
    k = min(top_k, len(probabilities))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Label(classes[i], float(probabilities[i])) for i in order]
