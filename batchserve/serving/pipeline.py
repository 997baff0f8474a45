"""The two stages after the Batcher: the model on the inference thread, then the index on
the index thread, with one search and one add per batch.

A ``Job`` is a decoded image and what to do with it (embed, search, add). The
``PipelineRunner`` runs a batch of jobs through the model, releases the Batcher's slot (so
the next batch can start on the model while this one is searched), then hands every search
and add of the batch to the index thread in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.python.failure import Failure

from batchserve.errors import NotReady, StorageFailed
from batchserve.models.batches import Prediction, predicted_class
from batchserve.serving.batching import Batch
from batchserve.serving.records import AddTask, EmbedTask, SearchTask, Task
from batchserve.storage.records import Match, NewItem
from batchserve.storage.store import ItemStore, OpenReport, SearchQuery

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """A decoded image [H, W, 3] and what to do with it; an add with crop views carries
    them [views, H, W, 3] until they are embedded into its task."""

    image: npt.NDArray[np.uint8]
    task: Task
    views: npt.NDArray[np.uint8] | None = None


@dataclass(frozen=True)
class Outcome:
    """One job's result, and the seconds its batch spent in the model and in the index."""

    prediction: Prediction
    matches: list[Match] | None = None
    added: str | None = None
    model_s: float = 0.0
    search_s: float = 0.0
    batch_size: int = 0


class IndexObserver(Protocol):
    def search_done(self, seconds: float) -> None: ...

    def index_size(self, items: int) -> None: ...


class ModelRunner(Protocol):
    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]: ...


class IndexWorker:
    """The index thread: one long-lived thread that owns the ItemStore; every search, add,
    delete and snapshot runs on it, one at a time.

    ``run_on_thread(f, *args) -> Deferred`` runs ``f`` on that thread (in the server, a
    one-thread pool; in unit tests, at once)."""

    def __init__(
        self,
        open_store: Callable[[], ItemStore],
        run_on_thread: Callable[..., Deferred[Any]],
        observer: IndexObserver | None = None,
    ) -> None:
        self._open_store = open_store
        self._run = run_on_thread
        self._observer = observer
        self._store: ItemStore | None = None

    @property
    def ready(self) -> bool:
        return self._store is not None

    def start(self) -> Deferred[OpenReport]:
        """Open the store on the index thread (snapshot load and replay, or rebuild)."""
        d: Deferred[tuple[ItemStore, OpenReport]] = self._run(self._open)
        return d.addCallback(self._became_ready)

    def _open(self) -> tuple[ItemStore, OpenReport]:
        store = self._open_store()
        return store, store.open()

    def _became_ready(self, opened: tuple[ItemStore, OpenReport]) -> OpenReport:
        store, report = opened
        self._store = store
        if self._observer is not None:
            self._observer.index_size(store.index.size)
        return report

    def call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(store, *args)`` on the index thread."""
        store = self._store
        if store is None:
            return fail(NotReady("the index is loading; retry shortly"))
        return self._run(self._observed, fn, store, *args)

    def _observed(self, fn: Callable[..., T], store: ItemStore, *args: Any) -> T:
        try:
            return fn(store, *args)
        finally:
            if self._observer is not None:
                self._observer.index_size(store.index.size)

    def close(self) -> Deferred[None]:
        """Snapshot (if anything changed) and close the catalog, on the index thread."""
        store, self._store = self._store, None
        if store is None:
            return succeed(None)
        return self._run(_final_snapshot, store)


def _final_snapshot(store: ItemStore) -> None:
    try:
        store.snapshot()
    finally:
        store.close()


def apply_tasks(
    store: ItemStore,
    work: Sequence[tuple[int, Task, Prediction]],
    classes: Sequence[str] | None,
    observer: IndexObserver | None = None,
) -> dict[int, Outcome | Failure]:
    """On the index thread: every add of a batch in one transaction and one index add, then
    every search of the batch in one index search (per distinct filter)."""
    results: dict[int, Outcome | Failure] = {}
    adds = [(i, t, p) for i, t, p in work if isinstance(t, AddTask)]
    searches = [(i, t, p) for i, t, p in work if isinstance(t, SearchTask)]
    if adds:
        items = [
            NewItem(
                t.id,
                p.embedding,
                t.label,
                t.metadata,
                predicted_class(p, classes),
                t.thumbnail,
                views=t.views,
            )
            for _i, t, p in adds
            if isinstance(t, AddTask)
        ]
        try:
            store.add(items)
        except NotReady as e:  # a shared catalog out of reach: 503, retry shortly
            results.update({i: Failure(e) for i, _t, _p in adds})
        except Exception as e:  # SQLite or disk errors: the adds fail, searches go on
            failure = Failure(StorageFailed(f"could not store the items: {e}"))
            results.update({i: failure for i, _t, _p in adds})
        else:
            results.update(
                {i: Outcome(p, added=t.id) for i, t, p in adds if isinstance(t, AddTask)}
            )
    if searches:
        queries = [
            SearchQuery(
                p.embedding,
                t.k,
                t.min_score,
                t.label,
                predicted_class(p, classes) if t.same_class else None,
            )
            for _i, t, p in searches
            if isinstance(t, SearchTask)
        ]
        started = time.perf_counter()
        found = store.search(queries)
        if observer is not None:
            observer.search_done(time.perf_counter() - started)
        for (i, _t, p), matches in zip(searches, found, strict=True):
            results[i] = Outcome(p, matches=matches)
    return results


class PipelineRunner:
    """Runs a batch of Jobs: the model, then (for searches and adds) the index."""

    def __init__(
        self,
        model: ModelRunner,
        index: IndexWorker,
        classes: Callable[[], Sequence[str] | None],
        observer: IndexObserver | None = None,
    ) -> None:
        self._model = model
        self._index = index
        self._classes = classes
        self._observer = observer
        # One batch in the index stage at a time: a batch done with the model waits here
        # while the previous one is searched, holding its Batcher slot, so the next batch
        # keeps filling instead of queueing tiny searches behind a slow index.
        self._index_stage_lock = DeferredLock()

    def run(self, batch: Batch[Job]) -> Deferred[Sequence[Outcome | Failure | None]]:
        images = batch.map(lambda job: job.image)
        started = time.perf_counter()
        d = self._model.run(images)
        return d.addCallback(self._index_stage, batch, started)

    def _index_stage(
        self, predictions: Sequence[Prediction | None], batch: Batch[Job], started: float
    ) -> Deferred[Sequence[Outcome | Failure | None]] | Sequence[Outcome | Failure | None]:
        model_done = time.perf_counter()
        model_s = model_done - started
        outcomes: list[Outcome | Failure | None] = [
            None if p is None else Outcome(p, model_s=model_s, batch_size=len(batch))
            for p in predictions
        ]
        work = [
            (i, job.task, p)
            for i, (job, p) in enumerate(zip(batch.payloads, predictions, strict=True))
            if p is not None and not isinstance(job.task, EmbedTask)
        ]
        if not work:
            batch.release()
            return outcomes
        if not self._index.ready:
            batch.release()
            failure = Failure(NotReady("the index is loading; retry shortly"))
            for i, _t, _p in work:
                outcomes[i] = failure
            return succeed(outcomes)

        def merge(
            results: dict[int, Outcome | Failure],
        ) -> Sequence[Outcome | Failure | None]:
            search_s = time.perf_counter() - model_done
            for i, result in results.items():
                if isinstance(result, Outcome):
                    result = replace(
                        result, model_s=model_s, search_s=search_s, batch_size=len(batch)
                    )
                outcomes[i] = result
            return outcomes

        def search_and_add() -> Deferred[Sequence[Outcome | Failure | None]]:
            batch.release()  # the model is free for the next batch while this one is searched
            d = self._index.call(apply_tasks, work, self._classes(), self._observer)
            return d.addCallback(merge)

        return self._index_stage_lock.run(search_and_add)
