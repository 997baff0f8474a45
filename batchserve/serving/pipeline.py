"""The two stages after the Batcher: the model on the inference thread, then the item store
on the store thread, with one search and one add per batch.

A ``Job`` is a decoded image and what to do with it (embed, search, add); ``submit_job``
queues its images (an add with item views: its image and each view, as items of their own).
The ``PipelineRunner`` runs a batch of jobs through the model, tells the Batcher it is free
for the next batch (so the next batch can start on the model while this one is searched),
then hands every search and add of the batch (an add with views once its last image is
embedded) to the store thread in one call.

Threads: ``PipelineRunner``, ``StoreWorker``'s methods, ``submit_job`` and ``ViewedAdd`` run
on the reactor; ``apply_tasks`` runs on the store thread, through ``StoreWorker.call``.
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
from batchserve.serving.batching import Batch, Batcher, gather
from batchserve.serving.records import AddTask, EmbedTask, SearchTask, Task
from batchserve.storage.records import Match, NewItem
from batchserve.storage.store import ItemStore, OpenReport, SearchQuery

T = TypeVar("T")


class ViewedAdd:
    """An add stored with the embeddings of its item views: the item's image and each view
    go through the model as jobs of their own, and the add joins the store stage of the
    batch in which the last of them is embedded. Reactor thread only."""

    def __init__(self, task: AddTask, images: int) -> None:
        self.task = task
        self._predictions: list[Prediction | None] = [None] * images

    def embedded(self, image: int, prediction: Prediction) -> tuple[AddTask, Prediction] | None:
        """Record the model's answer for image ``image`` (0: the item's own, then its
        views); once every image is in, the add (with its views' embeddings, float32
        [views, dim]) and the item's own prediction."""
        self._predictions[image] = prediction
        if any(p is None for p in self._predictions):
            return None
        whole, *views = [p for p in self._predictions if p is not None]
        stacked = np.stack([v.embedding for v in views]) if views else None
        return replace(self.task, views=stacked), whole


@dataclass(frozen=True)
class Part:
    """Image ``image`` of a ``ViewedAdd`` (0: the item's own, then its views)."""

    add: ViewedAdd
    image: int


@dataclass(frozen=True)
class Job:
    """A decoded image [H, W, 3] and what to do with it. An add with item views carries
    them [views, H, W, 3] until ``parts`` splits it into one embed per image; each of those
    knows the add it is ``part`` of."""

    image: npt.NDArray[np.uint8]
    task: Task
    views: npt.NDArray[np.uint8] | None = None
    part: Part | None = None

    @property
    def images(self) -> int:
        """How many images this job sends through the model."""
        return 1 if self.views is None else 1 + len(self.views)

    def parts(self) -> list[Job]:
        """The jobs queued for this one: itself; for an add with views, an embed of its
        image and one of each view, which the store stage joins back into the add."""
        if self.views is None:
            return [self]
        assert isinstance(self.task, AddTask), "only adds carry item views"
        add = ViewedAdd(self.task, self.images)
        images = [self.image, *self.views]
        return [Job(image, EmbedTask(), part=Part(add, i)) for i, image in enumerate(images)]


@dataclass(frozen=True)
class Outcome:
    """One job's result, and the seconds its batch spent in the model and in the store."""

    prediction: Prediction
    matches: list[Match] | None = None
    added: str | None = None
    model_s: float = 0.0
    search_s: float = 0.0
    batch_size: int = 0


def submit_job(batcher: Batcher[Job, Outcome], job: Job, timeout_s: float) -> Deferred[Outcome]:
    """Queue ``job``'s images; fires with its outcome once all are through the pipeline
    (for an add with views: the item's own, with the longest model and store times of
    their batches). Fails as a whole with the first of its images that fails; cancelling
    it cancels every one still queued."""
    parts = job.parts()
    if len(parts) == 1:
        return batcher.submit(parts[0], timeout_s=timeout_s)
    found = gather([batcher.submit(part, timeout_s=timeout_s) for part in parts])
    return found.addCallback(_joined)


def _joined(outcomes: list[Outcome]) -> Outcome:
    whole = outcomes[0]
    return replace(
        whole,
        added=next((o.added for o in outcomes if o.added is not None), None),
        model_s=max(o.model_s for o in outcomes),
        search_s=max(o.search_s for o in outcomes),
    )


class StoreObserver(Protocol):
    def search_done(self, seconds: float) -> None: ...

    def index_size(self, items: int) -> None: ...


class ModelRunner(Protocol):
    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]: ...


class StoreWorker:
    """The store thread: one long-lived thread that owns the ItemStore (its catalog and
    vector index); every search, add, delete and snapshot runs on it, one at a time.

    ``run_on_thread(f, *args) -> Deferred`` runs ``f`` on that thread (in the server, a
    one-thread pool; in unit tests, at once)."""

    def __init__(
        self,
        open_store: Callable[[], ItemStore],
        run_on_thread: Callable[..., Deferred[Any]],
        observer: StoreObserver | None = None,
    ) -> None:
        self._open_store = open_store
        self._run = run_on_thread
        self._observer = observer
        self._store: ItemStore | None = None

    @property
    def ready(self) -> bool:
        return self._store is not None

    def start(self) -> Deferred[OpenReport]:
        """Open the store on the store thread (snapshot load and replay, or rebuild)."""
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
        """Run ``fn(store, *args)`` on the store thread."""
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
        """Snapshot (if anything changed) and close the catalog, on the store thread."""
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
    observer: StoreObserver | None = None,
) -> dict[int, Outcome | Failure]:
    """On the store thread: every add of a batch in one transaction and one index add, then
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
    """Runs a batch of Jobs: the model, then (for searches and adds) the item store."""

    def __init__(
        self,
        model: ModelRunner,
        store: StoreWorker,
        classes: Callable[[], Sequence[str] | None],
        observer: StoreObserver | None = None,
    ) -> None:
        self._model = model
        self._store = store
        self._classes = classes
        self._observer = observer
        # One batch in the store stage at a time: a batch done with the model waits here
        # while the previous one is searched, holding its Batcher slot (its ``runner_free``
        # not yet fired), so the next batch keeps filling instead of queueing tiny searches
        # behind a slow index.
        self._store_stage_lock = DeferredLock()

    def run(self, batch: Batch[Job]) -> Deferred[Sequence[Outcome | Failure | None]]:
        images = batch.map(lambda job: job.image)
        started = time.perf_counter()
        d = self._model.run(images)
        return d.addCallback(self._store_stage, batch, started)

    def _store_stage(
        self, predictions: Sequence[Prediction | None], batch: Batch[Job], started: float
    ) -> Deferred[Sequence[Outcome | Failure | None]] | Sequence[Outcome | Failure | None]:
        model_done = time.perf_counter()
        model_s = model_done - started
        outcomes: list[Outcome | Failure | None] = [
            None if p is None else Outcome(p, model_s=model_s, batch_size=len(batch))
            for p in predictions
        ]
        work = _store_work(batch, predictions)
        if not work:
            batch.free()
            return outcomes
        if not self._store.ready:
            batch.free()
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
            batch.free()  # the next batch may start on the model while this one is searched
            d = self._store.call(apply_tasks, work, self._classes(), self._observer)
            return d.addCallback(merge)

        return self._store_stage_lock.run(search_and_add)


def _store_work(
    batch: Batch[Job], predictions: Sequence[Prediction | None]
) -> list[tuple[int, Task, Prediction]]:
    """The searches and adds of ``batch`` for the store thread: (item, task, prediction).
    An image of an add with views completes its add when it is the last one embedded; the
    add goes in its place. Only images still wanted count: once one of an add's images is
    refused, cancelled or past its deadline, the add fails as a whole and is never stored."""
    work: list[tuple[int, Task, Prediction]] = []
    live: set[int] | None = None
    for i, (job, p) in enumerate(zip(batch.payloads, predictions, strict=True)):
        if p is None:
            continue
        if job.part is not None:
            live = set(batch.live_indices()) if live is None else live
            if i in live and (add := job.part.add.embedded(job.part.image, p)) is not None:
                work.append((i, *add))
        elif not isinstance(job.task, EmbedTask):
            work.append((i, job.task, p))
    return work
