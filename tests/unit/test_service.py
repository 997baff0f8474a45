"""The service: gathering per-image results, admission, and the end-to-end deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from batchserve.batching import Batcher, BatchPolicy
from batchserve.errors import DeadlineExceeded, InvalidInput, Overloaded
from batchserve.images import DecodeLimits
from batchserve.service import ImageService, gather
from batchserve.testing import FakeModel, FakeRunner, encode_image


def outcome(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def test_gather_keeps_order() -> None:
    a: Deferred[int] = Deferred()
    b: Deferred[int] = Deferred()
    d = gather([a, b])
    b.callback(2)
    a.callback(1)
    assert outcome(d) == [1, 2]


def test_gather_fails_with_the_first_failure_and_cancels_the_rest() -> None:
    cancelled: list[str] = []
    a: Deferred[int] = Deferred()
    b: Deferred[int] = Deferred(lambda _d: cancelled.append("b"))
    d = gather([a, b])
    a.errback(InvalidInput("image 0 is corrupt"))
    assert outcome(d).check(InvalidInput)
    assert cancelled == ["b"]


def test_cancelling_gather_cancels_every_part() -> None:
    cancelled: list[int] = []
    parts: list[Deferred[int]] = [Deferred(lambda _d, i=i: cancelled.append(i)) for i in (0, 1)]
    d = gather(parts)
    d.cancel()
    assert cancelled == [0, 1]
    assert outcome(d).check(CancelledError)


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
            d.callback(f(*args))


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
    service = ImageService(batcher, pool, Ready(model or FakeModel()), DecodeLimits(), clock)
    return service, batcher, runner, pool, clock


def test_time_spent_decoding_counts_against_the_deadline() -> None:
    service, _batcher, runner, pool, clock = make(timeout_s=0.5)
    d = service.embed([encode_image()])
    clock.advance(0.6)  # decoding took longer than the whole deadline
    pool.finish_all()
    assert outcome(d).check(DeadlineExceeded)
    assert runner.sizes == []  # it never reached the model


def test_queue_deadline_is_what_is_left_after_decoding() -> None:
    service, batcher, _runner, pool, clock = make(timeout_s=0.5)
    batcher.submit("busy")  # occupies the runner, so the next image waits in the queue
    results: list[Any] = []
    service.embed([encode_image()]).addBoth(results.append)
    clock.advance(0.3)
    pool.finish_all()
    clock.advance(0.19)
    assert results == []
    clock.advance(0.02)  # 0.51 s after the request arrived
    assert results[0].check(DeadlineExceeded)


def test_images_being_decoded_count_toward_the_queue_limit() -> None:
    service, _batcher, _runner, _pool, _clock = make(max_queue=3)
    service.embed([encode_image(), encode_image()])  # still decoding
    assert service.decoding == 2
    rejected = service.embed([encode_image(), encode_image()])
    assert outcome(rejected).check(Overloaded)


def test_classify_needs_a_classifier_head() -> None:
    service, *_ = make(model=FakeModel(classes=None))
    assert outcome(service.classify([encode_image()], 3)).check(InvalidInput)


def test_a_catalog_that_cannot_be_written_fails_the_adds_only(tmp_path: Any) -> None:
    import sqlite3

    import numpy as np

    from batchserve.errors import StorageFailed
    from batchserve.index import IndexParams, VectorIndex
    from batchserve.inference import Prediction
    from batchserve.pipeline import AddTask, apply_tasks
    from batchserve.pipeline import SearchTask as Search
    from batchserve.store import ItemStore

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
