"""Composes the pipeline for a request: decode each image on the decode pool, submit each
to the Batcher as its own job, and gather the results in request order. Item reads,
deletes and searches by vector go straight to the index thread.

Returns Deferreds; knows nothing of HTTP. Cancelling a returned Deferred (the client hung
up) cancels every image of the request still queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from batchserve.batching import Batcher
from batchserve.catalog import Item
from batchserve.errors import DeadlineExceeded, InvalidInput, NotFound, NotReady, Overloaded
from batchserve.images import DecodeLimits, decode_image
from batchserve.inference import Prediction
from batchserve.models import ModelInfo
from batchserve.pipeline import (
    AddTask,
    EmbedTask,
    IndexWorker,
    Job,
    Outcome,
    SearchTask,
    Task,
)
from batchserve.store import ItemStore, Match, SearchQuery

T = TypeVar("T")

EMBED = EmbedTask()

#: Runs a blocking function on the decode thread pool: ``run(f, *args) -> Deferred``.
PoolRunner = Callable[..., Deferred[Any]]


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


@dataclass(frozen=True)
class Label:
    label: str
    score: float


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
        self._decoding = 0
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
    def decoding(self) -> int:
        """Images accepted and still being decoded."""
        return self._decoding

    # -- through the model ----------------------------------------------------------------

    def embed(self, images: Sequence[bytes]) -> Deferred[list[Prediction]]:
        """One Prediction per image, in order."""
        d = self._run([(data, EMBED) for data in images])
        return d.addCallback(lambda outcomes: [o.prediction for o in outcomes])

    def classify(self, images: Sequence[bytes], top_k: int) -> Deferred[list[list[Label]]]:
        """The ``top_k`` most likely labels of each image, best first."""
        info = self._model.info
        if info is not None and not info.classes:
            return fail(InvalidInput(f"model {info.name} has no classifier head"))
        classes = info.classes if info is not None else []

        def labels(predictions: list[Prediction]) -> list[list[Label]]:
            return [top_labels(p, classes or [], top_k) for p in predictions]

        return self.embed(images).addCallback(labels)

    def search(self, images: Sequence[bytes], task: SearchTask) -> Deferred[list[list[Match]]]:
        """The nearest items of each image, best first."""
        info = self._model.info
        if task.same_class and info is not None and not info.classes:
            return fail(InvalidInput(f"same_class needs a classifier; {info.name} has none"))
        d = self._run([(data, task) for data in images], needs_index=True)
        return d.addCallback(lambda outcomes: [o.matches or [] for o in outcomes])

    def add(self, entries: Sequence[tuple[bytes, AddTask]]) -> Deferred[list[str]]:
        """Store each image under its id; fires once every row is committed."""
        d = self._run(list(entries), needs_index=True)
        return d.addCallback(lambda outcomes: [o.added or "" for o in outcomes])

    def admit(self, images: int, needs_index: bool = False) -> ModelInfo:
        """The loaded model, if ``images`` more may go through it now. Raises NotReady while
        the model (or, with ``needs_index``, the index) loads and Overloaded when the queue
        has no room for them beside the images being decoded (the rejection is counted)."""
        info = self._model.info
        if info is None:
            raise NotReady("the model is loading; retry shortly")
        if needs_index and (self._index is None or not self._index.ready):
            raise NotReady("the index is loading; retry shortly")
        self._batcher.check_room(images, pending=self._decoding)
        return info

    def _run(
        self, jobs: Sequence[tuple[bytes, Task]], needs_index: bool = False
    ) -> Deferred[list[Outcome]]:
        if not jobs:
            return fail(InvalidInput("no image in the request"))
        try:
            info = self.admit(len(jobs), needs_index)
        except (NotReady, Overloaded) as e:
            return fail(e)
        # The deadline runs from now: time spent decoding counts against it.
        deadline_s = self._clock.seconds() + self._batcher.policy.timeout_s
        # Every image is decoded before any is queued: one bad image fails the request
        # before the model sees (or the catalog stores) any of its images.
        self._decoding += len(jobs)

        def decoded(result: object) -> object:
            self._decoding -= len(jobs)
            return result

        d = gather([self._run_in_pool(self._decode, data, info.input_size) for data, _t in jobs])
        d.addBoth(decoded)
        return d.addCallback(self._submit_all, [task for _data, task in jobs], deadline_s)

    def _submit_all(
        self, arrays: Sequence[npt.NDArray[np.uint8]], tasks: Sequence[Task], deadline_s: float
    ) -> Deferred[list[Outcome]]:
        left_s = deadline_s - self._clock.seconds()
        if left_s <= 0:
            for _task in tasks:
                self._batcher.count_rejection("deadline")
            return fail(DeadlineExceeded("deadline passed while the images were decoded"))
        return gather(
            [
                self._batcher.submit(Job(array, task), timeout_s=left_s)
                for array, task in zip(arrays, tasks, strict=True)
            ]
        )

    def _decode(self, data: bytes, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
        started = time.perf_counter()
        array = decode_image(data, size, self._limits)
        if self._observer is not None:
            self._observer.decoded(time.perf_counter() - started)
        return array

    # -- on the index thread only ---------------------------------------------------------

    def _store_call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._index is None or not self._index.ready:
            return fail(NotReady("the index is loading; retry shortly"))
        return self._index.call(fn, *args)

    def search_vectors(
        self, vectors: Sequence[Sequence[float]], task: SearchTask
    ) -> Deferred[list[list[Match]]]:
        """Nearest items of given embeddings (each of the model's dim, any norm > 0)."""
        info = self._model.info
        if info is None:
            return fail(NotReady("the model is loading; retry shortly"))
        if task.same_class:
            return fail(InvalidInput("same_class needs an image, not a vector"))
        try:
            queries = unit_vectors(vectors, info.dim)
        except InvalidInput as e:
            return fail(e)
        return self._store_call(_search_vectors, queries, task)

    def similar(self, item_id: str, task: SearchTask) -> Deferred[list[Match]]:
        """The nearest items of a stored item, itself excluded."""
        return self._store_call(_similar, item_id, task)

    def get(self, item_id: str) -> Deferred[Item]:
        return self._store_call(_get, item_id)

    def delete(self, item_id: str) -> Deferred[bool]:
        return self._store_call(_delete, item_id)

    def index_info(self) -> Deferred[dict[str, Any]]:
        return self._store_call(lambda store: store.describe())


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
