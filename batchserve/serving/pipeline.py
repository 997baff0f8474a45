"""The two stages after the Batcher: the model on the inference thread, then the item store
on the store thread, with one search and one add per batch.

A ``Job`` is a decoded image and what to do with it (embed, search, add); ``submit_jobs``
queues a request's jobs, each image as an item of its own. The adds of one request are
joined (``JoinedAdds``): their images (and item views) go through the model one by one, and
the adds are stored together, all or none. The ``PipelineRunner`` runs a batch of jobs
through the model, tells the Batcher it is free for the next batch (so the next batch can
start on the model while this one is searched), then hands every search and add of the
batch (a request's adds once the last of their images is embedded) to the store thread in
one call.

Threads: ``PipelineRunner``, ``StoreWorker``'s methods, ``submit_jobs`` and ``JoinedAdds``
run on the reactor; ``apply_tasks`` runs on the store thread, through ``StoreWorker.call``.
"""

from __future__ import annotations

import itertools
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
from batchserve.storage.outage import CatalogHealth
from batchserve.storage.records import Match, NewItem
from batchserve.storage.store import ItemStore, OpenReport, SearchQuery

T = TypeVar("T")


class JoinedAdds:
    """The adds of one request, stored together or not at all: every image of every add
    (the item's own, then its views) goes through the model as a job of its own, and all
    the adds join the store stage of the batch in which the last of those images is
    embedded: one catalog transaction and one index add with the rest of that batch's adds.
    An image that fails, is cancelled or passes its deadline fails the request's other
    images too (``gather``), so the last is never embedded and nothing is stored.
    Reactor thread only."""

    def __init__(self, adds: Sequence[tuple[AddTask, int]]) -> None:
        """``adds``: each add and how many images it sends through the model."""
        self._tasks = [task for task, _images in adds]
        self._starts = list(itertools.accumulate((n for _t, n in adds), initial=0))
        self._predictions: list[Prediction | None] = [None] * self._starts[-1]
        self._missing = self._starts[-1]

    def embedded(
        self, image: int, prediction: Prediction
    ) -> list[tuple[AddTask, Prediction]] | None:
        """Record the model's answer for image ``image`` (counted across the request's adds,
        each add's own image first, then its views); once every image is in, each add (with
        its views' embeddings, float32 [views, dim]) and its item's own prediction."""
        if self._predictions[image] is None:
            self._missing -= 1
        self._predictions[image] = prediction
        if self._missing:
            return None
        predictions = [p for p in self._predictions if p is not None]
        done = []
        for task, (start, end) in zip(self._tasks, itertools.pairwise(self._starts), strict=True):
            whole, *views = predictions[start:end]
            stacked = np.stack([v.embedding for v in views]) if views else None
            done.append((replace(task, views=stacked), whole))
        return done


@dataclass(frozen=True)
class Part:
    """Image ``image`` of a request's ``JoinedAdds``."""

    add: JoinedAdds
    image: int


@dataclass(frozen=True)
class Job:
    """A decoded image [H, W, 3] and what to do with it. An add with item views carries
    them [views, H, W, 3] until ``submit_jobs`` queues one embed per image; each of those
    knows the request's adds it is ``part`` of."""

    image: npt.NDArray[np.uint8]
    task: Task
    views: npt.NDArray[np.uint8] | None = None
    part: Part | None = None
    #: The edge process that sent it (``--workers``); -1: this process's own request.
    origin: int = -1

    @property
    def images(self) -> int:
        """How many images this job sends through the model."""
        return 1 if self.views is None else 1 + len(self.views)


@dataclass(frozen=True)
class Outcome:
    """One job's result, and the seconds its batch spent in the model and in the store."""

    prediction: Prediction
    matches: list[Match] | None = None
    added: str | None = None
    model_s: float = 0.0
    search_s: float = 0.0
    batch_size: int = 0


def submit_jobs(
    batcher: Batcher[Job, Outcome], jobs: Sequence[Job], timeout_s: float
) -> Deferred[list[Outcome]]:
    """Queue the images of one request's ``jobs``, each as an item of its own (so batches
    fill as before); fires with one outcome per job, in order, once all are through the
    pipeline (for an add: its own image's, with the longest model and store times of its
    images' batches). The request's adds are joined (``JoinedAdds``): stored all together
    in one transaction, or none of them. Fails as a whole with the first of its images that
    fails; cancelling it cancels every one still queued."""
    adds = [(job.task, job.images) for job in jobs if isinstance(job.task, AddTask)]
    joined = JoinedAdds(adds) if adds else None
    images = itertools.count()  # the request's add images, numbered across its adds
    queued: list[Job] = []
    spans: list[range] = []
    for job in jobs:
        start = len(queued)
        if joined is not None and isinstance(job.task, AddTask):
            pictures = [job.image] if job.views is None else [job.image, *job.views]
            queued.extend(
                Job(p, EmbedTask(), part=Part(joined, next(images)), origin=job.origin)
                for p in pictures
            )
        else:
            queued.append(job)
        spans.append(range(start, len(queued)))
    found = gather([batcher.submit(job, timeout_s=timeout_s) for job in queued])

    def per_job(outcomes: list[Outcome]) -> list[Outcome]:
        return [
            _joined(job, outcomes[s.start : s.stop]) for job, s in zip(jobs, spans, strict=True)
        ]

    return found.addCallback(per_job)


def _joined(job: Job, outcomes: list[Outcome]) -> Outcome:
    """One job's outcome from those of its images. Every image of a request succeeded, so
    its adds were stored: the last image embedded answers only once the store committed
    them all."""
    whole = outcomes[0]
    return replace(
        whole,
        added=job.task.id if isinstance(job.task, AddTask) else whole.added,
        model_s=max(o.model_s for o in outcomes),
        search_s=max(o.search_s for o in outcomes),
        batch_size=max(o.batch_size for o in outcomes),
    )


class LocalQueue:
    """The Batcher of this process as a service's ``JobQueue``."""

    def __init__(self, batcher: Batcher[Job, Outcome]) -> None:
        self.batcher = batcher

    @property
    def timeout_s(self) -> float:
        return self.batcher.policy.timeout_s

    def check_room(self, items: int, pending: int = 0, timeout_s: float | None = None) -> None:
        self.batcher.check_room(items, pending, timeout_s)

    def count_rejection(self, reason: str) -> None:
        self.batcher.count_rejection(reason)

    def images_per_s(self) -> float:
        return self.batcher.images_per_s()

    def stage(self, jobs: list[Job]) -> list[Job]:
        return jobs

    def discard(self, jobs: Sequence[Job]) -> None:
        pass

    def submit_jobs(self, jobs: Sequence[Job], timeout_s: float) -> Deferred[list[Outcome]]:
        return submit_jobs(self.batcher, jobs, timeout_s)


class StoreObserver(Protocol):
    def search_done(self, seconds: float) -> None: ...

    def index_size(self, items: int) -> None: ...

    def batch_edges(self, edges: int) -> None:
        """How many edge processes' images a batch held (only with edges)."""
        ...


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
        """Open, and not rebuilding its index (a replica found behind the change log's
        pruned horizon rebuilds while it runs: not ready until it has)."""
        return self._store is not None and not self._store.rebuilding

    @property
    def rebuilding(self) -> bool:
        return self._store is not None and self._store.rebuilding

    @property
    def catalog_health(self) -> CatalogHealth | None:
        """With a shared catalog, whether the store's last calls found it reachable, and
        if not why; None with the embedded catalog, or before the store is open. Read on
        the reactor thread, set on the store thread."""
        return None if self._store is None else self._store.catalog_health

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
    every search of the batch in one index search (per distinct filter). ``work`` is
    (item, task, prediction); the adds of one request share the item whose image completed
    them, and its outcome: they are stored together or fail together."""
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
                features=t.features,
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
        origins = {job.origin for job in batch.payloads if job.origin >= 0}
        if origins and self._observer is not None:
            self._observer.batch_edges(len(origins))
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
                current = outcomes[i]
                if isinstance(result, Outcome) and isinstance(current, Outcome):
                    # Each image keeps its own prediction, also when it completed adds.
                    result = replace(
                        current, matches=result.matches, added=result.added, search_s=search_s
                    )
                outcomes[i] = result
            return outcomes

        def search_and_add() -> Deferred[Sequence[Outcome | Failure | None]]:
            batch.free()  # the next batch may start on the model while this one is searched
            # While the previous batch was in the store, a request may have failed (one of its
            # images cancelled or past its deadline): what it asked is no longer done.
            live = set(batch.live_indices())
            wanted = [(i, task, p) for i, task, p in work if i in live]
            if not wanted:
                return succeed(outcomes)
            d = self._store.call(apply_tasks, wanted, self._classes(), self._observer)
            return d.addCallback(merge)

        return self._store_stage_lock.run(search_and_add)


def _store_work(
    batch: Batch[Job], predictions: Sequence[Prediction | None]
) -> list[tuple[int, Task, Prediction]]:
    """The searches and adds of ``batch`` for the store thread: (item, task, prediction).
    An image of a request's adds completes them when it is the last one embedded; they all
    go in its place. Only images still wanted count: once one of a request's images is
    refused, cancelled or past its deadline, the request fails as a whole and none of its
    adds is stored."""
    work: list[tuple[int, Task, Prediction]] = []
    live: set[int] | None = None
    for i, (job, p) in enumerate(zip(batch.payloads, predictions, strict=True)):
        if p is None:
            continue
        if job.part is not None:
            live = set(batch.live_indices()) if live is None else live
            if i in live and (adds := job.part.add.embedded(job.part.image, p)) is not None:
                work.extend((i, task, whole) for task, whole in adds)
        elif not isinstance(job.task, EmbedTask):
            work.append((i, job.task, p))
    return work
