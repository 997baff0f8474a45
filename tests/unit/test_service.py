"""The service: gathering per-image results, admission, and the end-to-end deadline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock

from batchserve.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
)
from batchserve.models.images import DecodeLimits
from batchserve.serving import decoding
from batchserve.serving.batching import Batcher, BatchPolicy, gather
from batchserve.serving.pipeline import LocalQueue, StoreWorker
from batchserve.serving.records import AddTask, EmbedTask, SearchRequest, SearchTask
from batchserve.serving.service import ImageService
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import Match, NewItem
from batchserve.storage.store import ItemStore
from batchserve.testing import FakeModel, FakeRunner, encode_image, result_of, run_now


def test_gather_keeps_order() -> None:
    a: Deferred[int] = Deferred()
    b: Deferred[int] = Deferred()
    d = gather([a, b])
    b.callback(2)
    a.callback(1)
    assert result_of(d) == [1, 2]


def test_gather_fails_with_the_first_failure_and_cancels_the_rest() -> None:
    cancelled: list[str] = []
    a: Deferred[int] = Deferred()
    b: Deferred[int] = Deferred(lambda _d: cancelled.append("b"))
    d = gather([a, b])
    a.errback(InvalidInput("image 0 is corrupt"))
    assert result_of(d).check(InvalidInput)
    assert cancelled == ["b"]


def test_cancelling_gather_cancels_every_part() -> None:
    cancelled: list[int] = []
    parts: list[Deferred[int]] = [Deferred(lambda _d, i=i: cancelled.append(i)) for i in (0, 1)]
    d = gather(parts)
    d.cancel()
    assert cancelled == [0, 1]
    assert result_of(d).check(CancelledError)


class SlowPool:
    """Runs decodes when the test says, so decode time can pass on the Clock."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((d, f, args))
        return d

    def finish_all(self) -> None:
        while self.jobs:
            d, f, args = self.jobs.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)


class Ready:
    def __init__(self, model: FakeModel) -> None:
        self.info = model.info


def make(
    timeout_s: float = 0.5, max_queue: int = 10, model: FakeModel | None = None
) -> tuple[Any, ...]:
    clock = Clock()
    runner: FakeRunner[Any] = FakeRunner()
    batcher: Batcher[Any, Any] = Batcher(
        runner, BatchPolicy(timeout_s=timeout_s, max_queue=max_queue), clock
    )
    pool = SlowPool()
    service = ImageService(
        LocalQueue(batcher), pool, Ready(model or FakeModel()), DecodeLimits(), clock
    )
    return service, batcher, runner, pool, clock


def test_time_spent_decoding_counts_against_the_deadline() -> None:
    service, _batcher, runner, pool, clock = make(timeout_s=0.5)
    d = service.embed(lambda: [encode_image()])
    clock.advance(0.6)  # decoding took longer than the whole deadline
    pool.finish_all()
    assert result_of(d).check(DeadlineExceeded)
    assert runner.sizes == []  # it never reached the model


def test_queue_deadline_is_what_is_left_after_decoding() -> None:
    service, batcher, _runner, pool, clock = make(timeout_s=0.5)
    batcher.submit("busy")  # occupies the runner, so the next image waits in the queue
    results: list[Any] = []
    service.embed(lambda: [encode_image()]).addBoth(results.append)
    clock.advance(0.3)
    pool.finish_all()
    clock.advance(0.19)
    assert results == []
    clock.advance(0.02)  # 0.51 s after the request arrived
    assert results[0].check(DeadlineExceeded)


def test_requests_being_read_count_toward_the_queue_limit() -> None:
    service, _batcher, _runner, pool, _clock = make(max_queue=3)
    for _ in range(3):  # three requests admitted, their bodies still being read
        service.embed(lambda: [encode_image()])
    assert service.reading == 3
    rejected = service.embed(lambda: [encode_image()])  # 3 + 1 > 3
    assert result_of(rejected).check(Overloaded)
    assert len(pool.jobs) == 3  # the refused request's body is never read


def test_a_request_whose_images_do_not_fit_the_queue_queues_none_of_them() -> None:
    service, batcher, runner, pool, _clock = make(max_queue=3)
    batcher.submit("busy")  # the runner is busy, so queued images stay queued
    d = service.embed(lambda: [encode_image() for _ in range(4)])  # 4 > 3
    pool.finish_all()
    assert result_of(d).check(Overloaded)
    assert batcher.queued == 0 and runner.sizes == [1]


def test_classify_needs_a_classifier_head() -> None:
    service, *_ = make(model=FakeModel(classes=None))
    assert result_of(service.classify(lambda: [encode_image()], 3)).check(InvalidInput)


def test_a_catalog_that_cannot_be_written_fails_the_adds_only(tmp_path: Any) -> None:
    import sqlite3

    import numpy as np

    from batchserve.errors import StorageFailed
    from batchserve.models.batches import Prediction
    from batchserve.serving.pipeline import apply_tasks
    from batchserve.serving.records import AddTask
    from batchserve.serving.records import SearchTask as Search
    from batchserve.storage.index import IndexParams, VectorIndex
    from batchserve.storage.store import ItemStore

    model = FakeModel()
    store = ItemStore(
        tmp_path, VectorIndex(model.info.dim, IndexParams()), model.info.fingerprint()
    )
    store.open()
    vector = np.ones(model.info.dim, dtype=np.float32) / np.sqrt(model.info.dim)

    def disk_full(_items: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    store.catalog.upsert = disk_full  # type: ignore[method-assign]
    prediction = Prediction(vector, None)
    results = apply_tasks(
        store, [(0, AddTask("x"), prediction), (1, Search(k=1), prediction)], None
    )
    assert results[0].check(StorageFailed)  # type: ignore[union-attr]
    assert "disk is full" in results[0].getErrorMessage()  # type: ignore[union-attr]
    assert results[1].matches == []  # type: ignore[union-attr]
    assert store.index.size == 0


# -- admission, readiness and the index thread ------------------------------------------


class RecordingObserver:
    """A BatchObserver and DecodeObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.rejected: list[str] = []
        self.decode_s: list[float] = []

    def queue_size(self, items: int) -> None:
        pass

    def batch_started(self, size: int, waits_s: Any) -> None:
        pass

    def item_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def decoded(self, seconds: float) -> None:
        self.decode_s.append(seconds)


class ModelState:
    """What the service sees of the inference worker; ``info`` is None while it loads."""

    def __init__(self, model: FakeModel | None) -> None:
        self.info = model.info if model is not None else None
        self.ready = model is not None


def unit(*components: float) -> npt.NDArray[np.float32]:
    """A unit float32 vector of DIM numbers starting with ``components``."""
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(components)] = components
    return (v / np.linalg.norm(v)).astype(np.float32)


DIM = 8
E0 = unit(1.0)
E1 = unit(0.0, 1.0)


def at_cosine(c: float) -> npt.NDArray[np.float32]:
    """A unit vector whose cosine with E0 is ``c``."""
    return unit(c, float(np.sqrt(1 - c * c)))


class IndexedService:
    """The service over a real ItemStore and StoreWorker in ``directory``, run at once on
    the test's thread; decodes wait in a SlowPool so a test can see whether any began."""

    def __init__(
        self,
        directory: Path,
        model: FakeModel | None = None,
        model_loaded: bool = True,
        index_loaded: bool = True,
        started: bool = True,
    ) -> None:
        self.model = model or FakeModel(dim=DIM)
        self.index = StoreWorker(
            lambda: ItemStore(
                directory,
                VectorIndex(DIM, IndexParams()),
                {"name": "fake", "dim": DIM},
            ),
            run_now,
        )
        if index_loaded:
            self.index.start()
        self.clock = Clock()
        self.runner: FakeRunner[Any] = FakeRunner()
        self.observer = RecordingObserver()
        self.batcher: Batcher[Any, Any] = Batcher(
            self.runner, BatchPolicy(timeout_s=0.5, max_queue=10), self.clock, self.observer
        )
        self.pool = SlowPool()
        self.service = ImageService(
            LocalQueue(self.batcher),
            self.pool,
            ModelState(self.model if model_loaded else None),
            DecodeLimits(),
            self.clock,
            store=self.index,
            observer=self.observer,
        )
        if started:
            self.service.mark_started()

    def store(self, *items: NewItem) -> None:
        result_of(self.index.call(lambda store: store.add(list(items))))

    def search(
        self,
        task: SearchTask,
        images: list[bytes] | None = None,
        vectors: Any = None,
    ) -> Any:
        """The result (or Failure) of a search, once its request is read on the pool."""
        d = self.service.search(lambda: SearchRequest(task, images=images or [], vectors=vectors))
        self.pool.finish_all()
        return result_of(d)


def test_image_search_and_add_while_the_index_loads_fail_before_any_image_is_decoded(
    tmp_path: Path,
) -> None:
    h = IndexedService(tmp_path, index_loaded=False)
    d = h.service.search(lambda: SearchRequest(SearchTask(), images=[encode_image()]))
    assert result_of(d).check(NotReady)
    assert result_of(h.service.add(lambda: [(encode_image(), AddTask("a"))])).check(NotReady)
    assert h.pool.jobs == []  # nothing was decoded
    assert h.service.reading == 0
    # embedding needs no index, so it is admitted
    h.service.embed(lambda: [encode_image()])
    assert len(h.pool.jobs) == 1


def test_same_class_search_on_a_model_without_classifier_is_invalid_and_decodes_nothing(
    tmp_path: Path,
) -> None:
    h = IndexedService(tmp_path, model=FakeModel(dim=DIM, classes=None))
    assert h.search(SearchTask(same_class=True), images=[encode_image()]).check(InvalidInput)
    assert h.observer.decode_s == [] and h.runner.sizes == []
    # without same_class the same model may search
    h.service.search(lambda: SearchRequest(SearchTask(), images=[encode_image()]))
    h.pool.finish_all()
    assert len(h.observer.decode_s) == 1 and h.runner.sizes == [1]


def test_classify_while_the_model_loads_fails_with_not_ready(tmp_path: Path) -> None:
    h = IndexedService(tmp_path, model_loaded=False)
    assert result_of(h.service.classify(lambda: [encode_image()], 3)).check(NotReady)
    assert h.pool.jobs == []


def test_item_routes_while_the_index_loads_fail_with_not_ready(tmp_path: Path) -> None:
    h = IndexedService(tmp_path, index_loaded=False)
    # each is a failed Deferred, not an exception raised at the caller
    assert result_of(h.service.get("a")).check(NotReady)
    assert result_of(h.service.delete("a")).check(NotReady)
    assert result_of(h.service.similar("a", SearchTask())).check(NotReady)
    assert result_of(h.service.index_info()).check(NotReady)
    assert h.search(SearchTask(), vectors=[list(E0)]).check(NotReady)


def test_item_routes_without_an_index_fail_with_not_ready() -> None:
    service, *_ = make()  # a service built with no index at all
    assert result_of(service.get("a")).check(NotReady)
    assert result_of(service.similar("a", SearchTask())).check(NotReady)


def test_vector_search_while_the_model_loads_fails_with_not_ready(tmp_path: Path) -> None:
    h = IndexedService(tmp_path, model_loaded=False)
    assert h.search(SearchTask(), vectors=[list(E0)]).check(NotReady)


def test_vector_search_with_same_class_is_invalid(tmp_path: Path) -> None:
    h = IndexedService(tmp_path)
    assert h.search(SearchTask(same_class=True), vectors=[list(E0)]).check(InvalidInput)


def test_not_ready_until_start_up_is_marked_over_even_with_model_and_index_up(
    tmp_path: Path,
) -> None:
    h = IndexedService(tmp_path, started=False)
    assert h.index.ready
    assert not h.service.ready
    h.service.mark_started()
    assert h.service.ready


def test_item_routes_read_and_delete_stored_items(tmp_path: Path) -> None:
    h = IndexedService(tmp_path)
    h.store(NewItem("a", E0, "x"))
    assert result_of(h.service.get("a")).label == "x"
    assert result_of(h.service.delete("a")) is True
    assert result_of(h.service.get("a")).check(NotFound)
    assert result_of(h.service.delete("a")).check(NotFound)
    assert result_of(h.service.similar("a", SearchTask())).check(NotFound)


# -- search by vector and by stored item --------------------------------------------------


def ids(matches: list[Match]) -> list[str]:
    return [m.id for m in matches]


def test_each_query_vector_is_normalised_on_its_own(tmp_path: Path) -> None:
    h = IndexedService(tmp_path)
    h.store(NewItem("a", E0))
    rows = [list(map(float, E0)), list(map(float, 3 * E0))]
    found = h.search(SearchTask(k=1), vectors=rows)
    assert [ids(m) for m in found] == [["a"], ["a"]]
    assert [m[0].score for m in found] == [pytest.approx(1.0), pytest.approx(1.0)]


@pytest.mark.parametrize(
    "vectors",
    [
        [["x"] * DIM],  # the right length, but not numbers
        [1.0] * DIM,  # one flat list, not a list of rows
        [[1.0] * (DIM - 1)],  # the wrong length
        [],  # no row
        [[0.0] * DIM],  # no direction
        [[float("nan")] + [1.0] * (DIM - 1)],
    ],
)
def test_malformed_query_vectors_are_invalid_input(tmp_path: Path, vectors: Any) -> None:
    h = IndexedService(tmp_path)
    assert h.search(SearchTask(), vectors=vectors).check(InvalidInput)


def test_vector_search_honours_k_min_score_and_label(tmp_path: Path) -> None:
    h = IndexedService(tmp_path)
    h.store(
        NewItem("a", at_cosine(0.9), "x"),
        NewItem("b", at_cosine(0.8), "y"),
        NewItem("c", at_cosine(0.1), "x"),
    )

    def search(**task: Any) -> list[str]:
        return ids(h.search(SearchTask(**task), vectors=[list(E0)])[0])

    assert search() == ["a", "b", "c"]
    assert search(k=2) == ["a", "b"]
    assert search(min_score=0.5) == ["a", "b"]
    assert search(label="x") == ["a", "c"]
    assert search(label="x", min_score=0.5) == ["a"]


def test_similar_honours_k_min_score_label_and_same_class(tmp_path: Path) -> None:
    h = IndexedService(tmp_path)
    h.store(
        NewItem("q", E0, "x", predicted_class="cat"),
        NewItem("a", at_cosine(0.9), "x", predicted_class="cat"),
        NewItem("b", at_cosine(0.8), "y", predicted_class="cat"),
        NewItem("c", at_cosine(0.7), "x", predicted_class="dog"),
        NewItem("d", at_cosine(0.1), "x", predicted_class="cat"),
    )

    def similar(**task: Any) -> list[str]:
        return ids(result_of(h.service.similar("q", SearchTask(**task))))

    assert similar() == ["a", "b", "c", "d"]  # never itself
    assert similar(k=2) == ["a", "b"]
    assert similar(min_score=0.5) == ["a", "b", "c"]
    assert similar(label="x") == ["a", "c", "d"]
    assert similar(same_class=True) == ["a", "b", "d"]
    assert similar(label="x", same_class=True) == ["a", "d"]
    assert similar(label="x", same_class=True, min_score=0.5) == ["a"]


# -- what operators see --------------------------------------------------------------------


def test_decode_time_is_reported_once_per_image_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decoder's clock, read as each decode begins and ends: 0.25 s, then 0.5 s.
    readings = iter([10.0, 10.25, 20.0, 20.5])
    monkeypatch.setattr(decoding, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    h = IndexedService(tmp_path)
    h.service.embed(lambda: [encode_image(), encode_image()])
    h.pool.finish_all()
    assert h.observer.decode_s == [0.25, 0.5]


def test_images_past_the_deadline_after_decoding_are_counted_as_deadline_rejections(
    tmp_path: Path,
) -> None:
    h = IndexedService(tmp_path)
    d = h.service.embed(lambda: [encode_image(), encode_image()])
    h.clock.advance(0.5)  # decoding used up the whole deadline, to the microsecond
    h.pool.finish_all()
    assert result_of(d).check(DeadlineExceeded)
    assert h.observer.rejected == ["deadline", "deadline"]
    assert h.runner.sizes == []


# -- adds with item views ------------------------------------------------------------------


def viewed_service(tmp_path: Path) -> IndexedService:
    return IndexedService(tmp_path, model=FakeModel(dim=DIM, crop_views=True))


def test_an_add_with_crop_views_queues_the_image_and_its_views_at_once(tmp_path: Path) -> None:
    h = viewed_service(tmp_path)
    h.service.add(lambda: [(encode_image(), AddTask("a"))])
    h.pool.finish_all()
    assert h.runner.sizes == [1] and h.batcher.queued == 5  # the model was idle: one went
    assert [job.task for job in h.runner.batches[0].payloads] == [EmbedTask()]


def test_an_add_whose_views_do_not_fit_the_queue_queues_nothing(tmp_path: Path) -> None:
    h = viewed_service(tmp_path)  # max_queue 10: two images with five views each need 12
    d = h.service.add(lambda: [(encode_image(), AddTask("a")), (encode_image(), AddTask("b"))])
    h.pool.finish_all()
    assert result_of(d).check(Overloaded)
    assert h.runner.sizes == [] and h.batcher.queued == 0


def test_cancelling_an_add_with_views_cancels_every_image_queued_for_it(tmp_path: Path) -> None:
    h = viewed_service(tmp_path)
    d = h.service.add(lambda: [(encode_image(), AddTask("a"))])
    h.pool.finish_all()
    d.cancel()
    assert result_of(d).check(CancelledError)
    assert h.batcher.queued == 0


def test_an_add_with_views_past_its_deadline_fails_and_stores_nothing(tmp_path: Path) -> None:
    h = viewed_service(tmp_path)
    d = h.service.add(lambda: [(encode_image(), AddTask("a"))])
    h.pool.finish_all()
    h.clock.advance(0.6)  # the deadline (0.5 s) passes with the views still queued
    assert result_of(d).check(DeadlineExceeded)
    assert result_of(h.index.call(lambda store: store.catalog.count())) == 0
