"""Composes the pipeline for a request: read the request's body and decode its images as
one job on the decode pool, submit each image to the Batcher as its own job, and gather the
results in request order. Item reads, deletes and searches by vector go to the index thread.

The reactor only admits a request (model and index ready, room in the queue) and queues
its decoded images; reading the body, splitting it and decoding happen off it. Returns
Deferreds; knows nothing of HTTP: a request's body comes as a function that reads it.
Cancelling a returned Deferred (the client hung up) cancels every image still queued.
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

from batchserve.errors import DeadlineExceeded, InvalidInput, NotFound, NotReady, Overloaded
from batchserve.models.batches import Prediction
from batchserve.models.images import (
    DecodeLimits,
    decode_for,
    decode_item_for,
    fit_pixels,
    make_thumbnail,
)
from batchserve.models.spec import ModelInfo
from batchserve.serving.batching import Batcher
from batchserve.serving.pipeline import IndexWorker, Job, Outcome, apply_tasks
from batchserve.serving.records import AddTask, EmbedTask, Label, SearchRequest, SearchTask, Task
from batchserve.serving.timings import Timings
from batchserve.storage.records import Item, Match
from batchserve.storage.store import IndexState, ItemStore, SearchQuery

T = TypeVar("T")

EMBED = EmbedTask()

#: Runs a blocking function on the decode thread pool: ``run(f, *args) -> Deferred``.
PoolRunner = Callable[..., Deferred[Any]]

#: Reads a request's body (on the decode pool): its encoded images, or more.
Reader = Callable[[], T]


class DecodeObserver(Protocol):
    def decoded(self, seconds: float) -> None:
        """Called on a decode thread (must be thread-safe)."""
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


@dataclass(frozen=True)
class _VectorSearch:
    """A search by query vectors, checked and L2-normalised: [N, dim] float32."""

    queries: npt.NDArray[np.float32]
    task: SearchTask


def gather(deferreds: Sequence[Deferred[T]]) -> Deferred[list[T]]:
    """Results of all ``deferreds`` in order; fails with the first failure and cancels the
    rest; cancelling the result cancels them all."""
    results: list[Any] = [None] * len(deferreds)
    remaining = [len(deferreds)]

    def cancel_all(_d: object = None) -> None:
        for d in deferreds:
            d.cancel()

    out: Deferred[list[T]] = Deferred(cancel_all)
    if not deferreds:
        out.callback([])
        return out

    def ok(result: T, i: int) -> None:
        results[i] = result
        remaining[0] -= 1
        if remaining[0] == 0 and not out.called:
            out.callback(results)

    def bad(failure: Failure, i: int) -> None:
        if not out.called:
            out.errback(failure)
            cancel_all()

    for i, d in enumerate(deferreds):
        d.addCallbacks(ok, bad, callbackArgs=(i,), errbackArgs=(i,))
    return out


class ImageService:
    """Embeds, classifies, searches and adds images through the Batcher; reads and deletes
    items on the index thread."""

    def __init__(
        self,
        batcher: Batcher[Job, Outcome],
        run_in_pool: PoolRunner,
        model: ModelStatus,
        limits: DecodeLimits,
        clock: IReactorTime,
        index: IndexWorker | None = None,
        observer: DecodeObserver | None = None,
    ) -> None:
        self._batcher = batcher
        self._clock = clock
        self._run_in_pool = run_in_pool
        self._model = model
        self._index = index
        self._limits = limits
        self._observer = observer
        self._reading = 0
        self._started = index is None

    @property
    def info(self) -> ModelInfo | None:
        """The loaded model, or None while it loads."""
        return self._model.info

    @property
    def ready(self) -> bool:
        """Model warm, index loaded, and start-up work (the demo photos) done."""
        return self._started and self._model.ready and (self._index is None or self._index.ready)

    def mark_started(self) -> None:
        """Start-up is over: /readyz may answer 200 once the model and index are up."""
        self._started = True

    @property
    def reading(self) -> int:
        """Requests accepted whose bodies are still being read and decoded."""
        return self._reading

    def loaded(self, needs_index: bool = False) -> ModelInfo:
        """The loaded model; NotReady while it (or, with ``needs_index``, the index) loads."""
        info = self._model.info
        if info is None:
            raise NotReady("the model is loading; retry shortly")
        if needs_index and (self._index is None or not self._index.ready):
            raise NotReady("the index is loading; retry shortly")
        return info

    def admit(self, needs_index: bool = False) -> ModelInfo:
        """The loaded model, if a request for it may start now: NotReady while the model
        (or, with ``needs_index``, the index) loads, Overloaded (counted) when the queue has
        no room for one more image beside the requests still being read. The HTTP layer
        calls it from a request's headers, before its body is in; the service again when
        the body is in; the queue checks the full count once the images are decoded."""
        info = self.loaded(needs_index)
        self._batcher.check_room(1, pending=self._reading)
        return info

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
        self, read: Reader[Sequence[bytes | npt.NDArray[np.uint8]]], call: Call | None = None
    ) -> Deferred[list[Prediction]]:
        """The model's whole answer (embedding and class probabilities) for each image,
        encoded or already decoded (pixels are resized to the model's input if need be)."""
        d = self._through_model(lambda: [(image, EMBED) for image in read()], call)
        return d.addCallback(lambda outcomes: [o.prediction for o in outcomes])

    def add(
        self, read: Reader[Sequence[tuple[bytes, AddTask]]], call: Call | None = None
    ) -> Deferred[list[str]]:
        """Store each image under its id; fires once every row is committed."""
        d = self._through_model(read, call, needs_index=True)
        return d.addCallback(lambda outcomes: [o.added or "" for o in outcomes])

    def search(
        self, read: Reader[SearchRequest], call: Call | None = None
    ) -> Deferred[list[list[Match]]]:
        """The nearest items of each query image or vector, best first."""
        try:
            info = self.loaded(needs_index=True)
        except NotReady as e:
            return fail(e)
        call = call or Call()
        # Whether the request holds images or vectors is known once it is read: a search by
        # vectors never reaches the model's queue, so only the queue refuses image searches.
        call.admitted_s = self._clock.seconds()
        d = self._off_reactor(call, _search_jobs, read, info, self._limits, self._observer)

        def route(prepared: list[Job] | _VectorSearch) -> Deferred[list[list[Match]]]:
            if isinstance(prepared, _VectorSearch):
                return self._timed_search(call, prepared)
            found = self._submit_all(prepared, call)
            return found.addCallback(lambda outcomes: [o.matches or [] for o in outcomes])

        return d.addCallback(route)

    def _timed_search(self, call: Call, search: _VectorSearch) -> Deferred[list[list[Match]]]:
        started = time.perf_counter()

        def timed(found: list[list[Match]]) -> list[list[Match]]:
            call.timings.search_s = time.perf_counter() - started
            return found

        d = self._store_call(_search_vectors, search.queries, search.task)
        return d.addCallback(timed)

    def _through_model(
        self,
        read: Reader[Sequence[tuple[bytes | npt.NDArray[np.uint8], Task]]],
        call: Call | None,
        needs_index: bool = False,
    ) -> Deferred[list[Outcome]]:
        try:
            info = self.admit(needs_index)
        except (NotReady, Overloaded) as e:
            return fail(e)
        call = call or Call()
        call.admitted_s = self._clock.seconds()
        d = self._off_reactor(call, _decoded_jobs, read, info, self._limits, self._observer)
        return d.addCallback(self._submit_all, call)

    def _deadline_s(self, call: Call) -> float:
        # The deadline runs from admission: time spent reading and decoding counts. It is
        # worked out once the body is read, which may carry the request's own deadline.
        timeout_s = self._batcher.policy.timeout_s
        if call.timeout_s is not None:
            timeout_s = min(timeout_s, call.timeout_s)
        return call.admitted_s + timeout_s

    def _off_reactor(self, call: Call, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(*args)`` on the decode pool, counted as a request being read."""
        self._reading += 1

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                call.timings.decode_s = time.perf_counter() - started

        def done(result: T) -> T:
            self._reading -= 1
            return result

        d: Deferred[T] = self._run_in_pool(timed)
        return d.addBoth(done)

    def _submit_all(self, jobs: Sequence[Job], call: Call) -> Deferred[list[Outcome]]:
        left_s = self._deadline_s(call) - self._clock.seconds()
        if left_s <= 0:
            for _job in jobs:
                self._batcher.count_rejection("deadline")
            return fail(DeadlineExceeded("deadline passed while the images were decoded"))
        try:
            # All of a request's images (item views included) fit in the queue, or none is.
            images = sum(1 + (0 if job.views is None else len(job.views)) for job in jobs)
            self._batcher.check_room(images, pending=self._reading)
        except Overloaded as e:
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

        if any(job.views is not None for job in jobs):
            found = self._add_with_views(jobs, left_s)
        else:
            found = gather([self._batcher.submit(job, timeout_s=left_s) for job in jobs])
        return found.addCallback(timed)

    def _add_with_views(self, jobs: Sequence[Job], left_s: float) -> Deferred[list[Outcome]]:
        """Adds with item views: every image of the request (its items, then their views)
        goes through the model at once, then the items are stored in one call on the index
        thread, each with the embeddings of its views."""
        images = [job.image for job in jobs] + [v for job in jobs for v in _views(job)]
        found = gather([self._batcher.submit(Job(i, EMBED), timeout_s=left_s) for i in images])
        return found.addCallback(self._store_with_views, jobs)

    def _store_with_views(
        self, outcomes: list[Outcome], jobs: Sequence[Job]
    ) -> Deferred[list[Outcome]]:
        wholes, views = outcomes[: len(jobs)], iter(outcomes[len(jobs) :])
        work: list[tuple[int, Task, Prediction]] = []
        for i, (job, whole) in enumerate(zip(jobs, wholes, strict=True)):
            assert isinstance(job.task, AddTask)  # only adds carry views
            taken = [next(views).prediction.embedding for _view in _views(job)]
            task = dataclasses.replace(job.task, views=np.stack(taken) if taken else None)
            work.append((i, task, whole.prediction))
        info = self._model.info
        model_s = max(o.model_s for o in outcomes)  # the views' batches count too
        started = time.perf_counter()

        def stored(results: dict[int, Outcome | Failure]) -> list[Outcome] | Failure:
            search_s = time.perf_counter() - started
            failed = [r for r in results.values() if isinstance(r, Failure)]
            if failed:
                return failed[0]
            return [
                dataclasses.replace(r, model_s=model_s, search_s=search_s, batch_size=w.batch_size)
                for r, w in zip((results[i] for i in range(len(jobs))), wholes, strict=True)
                if isinstance(r, Outcome)
            ]

        d = self._store_call(apply_tasks, work, info.classes if info is not None else None)
        return d.addCallback(stored)

    # -- on the index thread only ---------------------------------------------------------

    def _store_call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            self.loaded(needs_index=True)
        except NotReady as e:
            return fail(e)
        assert self._index is not None
        return self._index.call(fn, *args)

    def similar(self, item_id: str, task: SearchTask) -> Deferred[list[Match]]:
        """The nearest items of a stored item, itself excluded."""
        return self._store_call(_similar, item_id, task)

    def get(self, item_id: str) -> Deferred[Item]:
        return self._store_call(_get, item_id)

    def delete(self, item_id: str) -> Deferred[bool]:
        return self._store_call(_delete, item_id)

    def page(self, limit: int, before: int | None) -> Deferred[list[Item]]:
        """Up to ``limit`` items, newest first, older than row ``before``."""
        return self._store_call(lambda store: store.catalog.page(limit, before))

    def thumbnail(self, item_id: str) -> Deferred[tuple[int, bytes | None]]:
        """(the item's row, its thumbnail JPEG or None); NotFound when there is no item."""
        return self._store_call(_thumbnail, item_id)

    def index_info(self) -> Deferred[IndexState]:
        return self._store_call(lambda store: store.describe())


# -- on the decode pool -----------------------------------------------------------------


def _decoded_jobs(
    read: Reader[Sequence[tuple[bytes | npt.NDArray[np.uint8], Task]]],
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
) -> list[Job]:
    """Read the request, then decode every image: one bad image fails the request before
    the model sees (or the catalog stores) any of its images."""
    entries = read()
    if not entries:
        raise InvalidInput("no image in the request")
    jobs = []
    for data, task in entries:
        task = _with_thumbnail(task, data, limits)
        if isinstance(task, AddTask) and info.views and isinstance(data, bytes):
            pictures = _decode(data, info, limits, observer, item_views=True)
            jobs.append(Job(pictures[0], task, views=pictures[1:]))
        else:
            jobs.append(Job(_decode(data, info, limits, observer), task))
    return jobs


def _views(job: Job) -> Sequence[npt.NDArray[np.uint8]]:
    """The crop views of an add's image [H, W, 3] each, none for other jobs."""
    return () if job.views is None else list(job.views)


def _with_thumbnail(task: Task, data: bytes | npt.NDArray[np.uint8], limits: DecodeLimits) -> Task:
    """An add stores a thumbnail of its image beside the embedding."""
    if isinstance(task, AddTask) and task.thumbnail is None and isinstance(data, bytes):
        return dataclasses.replace(task, thumbnail=make_thumbnail(data, limits))
    return task


def _search_jobs(
    read: Reader[SearchRequest],
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
) -> list[Job] | _VectorSearch:
    request = read()
    if request.vectors is not None:
        if request.task.same_class:
            raise InvalidInput("same_class needs an image, not a vector")
        return _VectorSearch(unit_vectors(request.vectors, info.dim), request.task)
    if request.task.same_class and not info.classes:
        raise InvalidInput(f"same_class needs a classifier; {info.name} has none")
    entries = [(data, request.task) for data in request.images]
    return _decoded_jobs(lambda: entries, info, limits, observer)


def _decode(
    data: bytes | npt.NDArray[np.uint8],
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
    item_views: bool = False,
) -> npt.NDArray[np.uint8]:
    """The image as model input [H, W, 3]; with ``item_views``, it and its crop views
    [1 + views, H, W, 3] (encoded images only: adds never carry pixels)."""
    started = time.perf_counter()
    if isinstance(data, np.ndarray):
        array = fit_pixels(data, info.input_size)
    elif item_views:
        array = decode_item_for(data, info, limits)
    else:
        array = decode_for(data, info, limits)
    if observer is not None:
        observer.decoded(time.perf_counter() - started)
    return array


def unit_vectors(vectors: Sequence[Sequence[float]], dim: int) -> npt.NDArray[np.float32]:
    """Validate and L2-normalise query vectors: [N, dim], finite, non-zero."""
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidInput("vectors must be a list of lists of numbers") from e
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
        raise InvalidInput(f"vectors must be a non-empty list of {dim}-number lists")
    if not np.isfinite(array).all():
        raise InvalidInput("vectors must not hold NaN or infinity")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInput("a zero vector has no direction to search")
    unit: npt.NDArray[np.float32] = (array / norms).astype(np.float32)
    return unit


def _search_vectors(
    store: ItemStore, queries: npt.NDArray[np.float32], task: SearchTask
) -> list[list[Match]]:
    return store.search([SearchQuery(q, task.k, task.min_score, task.label) for q in queries])


def _similar(store: ItemStore, item_id: str, task: SearchTask) -> list[Match]:
    found = store.catalog.get(item_id)
    vector = store.embedding(item_id)
    if found is None or vector is None:
        raise NotFound(f"no item with id {item_id!r}")
    klass = found.predicted_class if task.same_class else None
    query = SearchQuery(vector, task.k, task.min_score, task.label, klass, exclude=item_id)
    return store.search([query])[0]


def _get(store: ItemStore, item_id: str) -> Item:
    item = store.get(item_id)
    if item is None:
        raise NotFound(f"no item with id {item_id!r}")
    return item


def _thumbnail(store: ItemStore, item_id: str) -> tuple[int, bytes | None]:
    found = store.catalog.thumbnail(item_id)
    if found is None:
        raise NotFound(f"no item with id {item_id!r}")
    return found


def _delete(store: ItemStore, item_id: str) -> bool:
    if not store.delete(item_id):
        raise NotFound(f"no item with id {item_id!r}")
    return True


def top_labels(prediction: Prediction, classes: Sequence[str], top_k: int) -> list[Label]:
    """The ``top_k`` classes of ``prediction`` by probability, best first."""
    probabilities = prediction.probabilities
    if probabilities is None:
        raise InvalidInput("the model has no classifier head")
    k = min(top_k, len(probabilities))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Label(classes[i], float(probabilities[i])) for i in order]
