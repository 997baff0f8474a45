"""The index stage of a batch: every add of a batch in one catalog transaction and one
index add, every search in one index search per distinct filter; the index worker's
lifecycle; the pipeline runner behind a Batcher. Real SQLite and FAISS in a temporary
directory; no threads, no reactor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from batchserve.errors import NotReady
from batchserve.models.batches import Prediction
from batchserve.serving.batching import Batch, Batcher, BatchPolicy
from batchserve.serving.pipeline import Job, Outcome, PipelineRunner, StoreWorker, apply_tasks
from batchserve.serving.records import AddTask, EmbedTask, SearchTask
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.store import ItemStore
from batchserve.testing import FakeModel, SyncModelRunner, result_of

DIM = 8
CLASSES = ["cat", "dog"]


def prediction(seed: int, klass: int = 0) -> Prediction:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    probabilities = np.eye(len(CLASSES), dtype=np.float32)[klass]
    return Prediction(v / np.linalg.norm(v), probabilities)


def open_store(path: Path) -> ItemStore:
    store = ItemStore(path, VectorIndex(DIM, IndexParams()), {"name": "m", "dim": DIM})
    store.open()
    return store


def test_a_batch_of_adds_and_searches_is_one_transaction_one_add_and_one_search(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path)
    adds = [(i, AddTask(f"item{i}", label="x"), prediction(i, i % 2)) for i in range(4)]
    searches = [(4 + i, SearchTask(k=1), prediction(i)) for i in range(3)]
    results = apply_tasks(store, adds + searches, CLASSES)

    assert store.catalog.commits == 1
    assert (store.index.calls["add"], store.index.calls["search"]) == (1, 1)
    assert [results[i].added for i in range(4) if isinstance(results[i], Outcome)] == [
        "item0",
        "item1",
        "item2",
        "item3",
    ]
    found = [results[4 + i] for i in range(3)]
    assert [r.matches[0].id for r in found if isinstance(r, Outcome) and r.matches] == [
        "item0",
        "item1",
        "item2",
    ]
    assert store.get("item1") is not None and store.get("item1").predicted_class == "dog"


def test_same_class_searches_stay_within_the_predicted_class(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    apply_tasks(store, [(i, AddTask(f"item{i}"), prediction(i, i % 2)) for i in range(6)], CLASSES)
    query = prediction(1, klass=0)  # item1's vector, but predicted "cat"
    results = apply_tasks(store, [(0, SearchTask(k=6, same_class=True), query)], CLASSES)
    outcome = results[0]
    assert isinstance(outcome, Outcome) and outcome.matches is not None
    assert {m.id for m in outcome.matches} == {"item0", "item2", "item4"}


def test_embed_tasks_never_reach_the_index(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert apply_tasks(store, [(0, EmbedTask(), prediction(0))], CLASSES) == {}
    assert store.index.calls == {} and store.catalog.commits == 0


def test_a_model_without_classes_stores_no_predicted_class(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    headless = Prediction(prediction(0).embedding, None)
    apply_tasks(store, [(0, AddTask("a"), prediction(1)), (1, AddTask("b"), headless)], None)
    assert store.get("a") is not None and store.get("a").predicted_class is None
    assert store.get("b") is not None and store.get("b").predicted_class is None


# -- the index worker and the pipeline runner --------------------------------------------


class RecordingThread:
    """Stands in for the index thread: runs each call at once and records the function."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append(f)
        return maybeDeferred(f, *args)


class RecordingStoreObserver:
    def __init__(self) -> None:
        self.searches_s: list[float] = []
        self.sizes: list[int] = []

    def search_done(self, seconds: float) -> None:
        self.searches_s.append(seconds)

    def index_size(self, items: int) -> None:
        self.sizes.append(items)


MODEL = FakeModel()


def image(r: int, g: int, b: int) -> npt.NDArray[np.uint8]:
    return np.full((32, 32, 3), (r, g, b), dtype=np.uint8)


def embedding_of(picture: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return MODEL.predict(picture[None]).embeddings[0]


def worker(
    tmp_path: Path, observer: RecordingStoreObserver | None = None
) -> tuple[StoreWorker, RecordingThread, list[ItemStore]]:
    opened: list[ItemStore] = []

    def open_store() -> ItemStore:
        store = ItemStore(
            tmp_path, VectorIndex(MODEL.info.dim, IndexParams()), MODEL.info.fingerprint()
        )
        opened.append(store)
        return store

    thread = RecordingThread()
    return StoreWorker(open_store, thread, observer), thread, opened


class Gate:
    """A BatchRunner that holds each batch until the test passes it on to ``inner``."""

    def __init__(self, inner: PipelineRunner) -> None:
        self.inner = inner
        self.held: list[tuple[Batch[Job], Deferred[Sequence[Any]]]] = []

    def run(self, batch: Batch[Job]) -> Deferred[Sequence[Any]]:
        d: Deferred[Sequence[Any]] = Deferred()
        self.held.append((batch, d))
        return d

    def pass_one(self) -> None:
        batch, d = self.held.pop(0)
        self.inner.run(batch).chainDeferred(d)


def pipeline(
    index: StoreWorker, observer: RecordingStoreObserver | None = None
) -> tuple[Batcher[Job, Outcome], Gate]:
    runner = PipelineRunner(
        SyncModelRunner(FakeModel()), index, lambda: MODEL.info.classes, observer
    )
    gate = Gate(runner)
    return Batcher(gate, BatchPolicy(max_batch_size=8), Clock()), gate


def test_store_worker_is_not_ready_before_start_and_refuses_calls(tmp_path: Path) -> None:
    index, thread, _opened = worker(tmp_path)
    assert not index.ready
    assert result_of(index.call(lambda store: store.index.size)).check(NotReady)
    assert thread.calls == []
    result_of(index.start())
    assert index.ready
    assert result_of(index.call(lambda store: store.index.size)) == 0


def test_index_size_is_reported_after_start_and_after_each_add_and_delete(
    tmp_path: Path,
) -> None:
    observer = RecordingStoreObserver()
    index, _thread, _opened = worker(tmp_path, observer)
    result_of(index.start())
    assert observer.sizes == [0]
    jobs = [(i, AddTask(f"item{i}"), prediction(i)) for i in range(3)]
    result_of(index.call(apply_tasks, jobs, CLASSES))
    assert observer.sizes == [0, 3]
    assert result_of(index.call(lambda store: store.delete("item1"))) is True
    assert observer.sizes == [0, 3, 2]


def test_close_snapshots_and_closes_the_store_and_a_second_close_does_nothing(
    tmp_path: Path,
) -> None:
    index, thread, opened = worker(tmp_path)
    result_of(index.start())
    result_of(index.call(apply_tasks, [(0, AddTask("kept"), prediction(0))], CLASSES))
    calls_before = len(thread.calls)

    assert result_of(index.close()) is None
    assert not index.ready
    assert len(thread.calls) == calls_before + 1  # the snapshot and close ran on the thread
    assert sorted(p.name for p in opened[0].snapshot_dir.glob("index-*.json")) == [
        "index-000000000001.json"
    ]
    assert result_of(index.call(lambda store: store.index.size)).check(NotReady)

    assert result_of(index.close()) is None
    assert len(thread.calls) == calls_before + 1

    again, _thread, reopened = worker(tmp_path)
    report = result_of(again.start())
    assert (report.rebuilt, report.snapshot_seq, report.replayed) == (False, 1, 0)
    assert reopened[0].get("kept") is not None


def test_pipeline_with_an_observer_answers_searches_and_times_one_search_per_batch(
    tmp_path: Path,
) -> None:
    observer = RecordingStoreObserver()
    index, _thread, _opened = worker(tmp_path)
    result_of(index.start())
    batcher, gate = pipeline(index, observer)
    red, blue = image(200, 30, 30), image(30, 30, 200)
    added = [batcher.submit(Job(red, AddTask("red"))), batcher.submit(Job(blue, AddTask("blue")))]
    gate.pass_one()  # the first add went alone; the second waits in the next batch
    gate.pass_one()
    stored = [result_of(d) for d in added]
    assert [o.added for o in stored] == ["red", "blue"]
    np.testing.assert_allclose(stored[1].prediction.embedding, embedding_of(blue), rtol=1e-6)
    assert observer.searches_s == []  # adds only: no search to time

    found = [batcher.submit(Job(picture, SearchTask(k=1))) for picture in (blue, red, blue)]
    gate.pass_one()  # the first search alone, then the other two in one batch
    gate.pass_one()
    outcomes = [result_of(d) for d in found]
    assert [o.matches[0].id for o in outcomes] == ["blue", "red", "blue"]
    np.testing.assert_allclose(outcomes[1].prediction.embedding, embedding_of(red), rtol=1e-6)
    assert len(observer.searches_s) == 2
    assert all(0.0 <= s < 5.0 for s in observer.searches_s)


def test_embeds_succeed_and_searches_fail_with_not_ready_while_the_index_loads(
    tmp_path: Path,
) -> None:
    index, thread, _opened = worker(tmp_path)
    batcher, gate = pipeline(index)
    red, blue = image(200, 30, 30), image(30, 30, 200)
    alone = batcher.submit(Job(red, EmbedTask()))
    search, embed = batcher.submit(Job(blue, SearchTask())), batcher.submit(Job(red, EmbedTask()))
    gate.pass_one()
    gate.pass_one()
    outcome = result_of(alone)
    assert isinstance(outcome, Outcome) and outcome.matches is None
    np.testing.assert_allclose(outcome.prediction.embedding, embedding_of(red), rtol=1e-6)
    failure = result_of(search)
    assert isinstance(failure, Failure) and failure.check(NotReady)
    np.testing.assert_allclose(result_of(embed).prediction.embedding, embedding_of(red), rtol=1e-6)
    assert thread.calls == []


def test_a_search_skipped_after_handover_does_not_fail_the_rest_of_its_batch(
    tmp_path: Path,
) -> None:
    index, _thread, _opened = worker(tmp_path)
    result_of(index.start())
    batcher, gate = pipeline(index)
    red, blue = image(200, 30, 30), image(30, 30, 200)
    batcher.submit(Job(red, AddTask("red")))
    skipped = batcher.submit(Job(blue, SearchTask(k=1)))
    embed = batcher.submit(Job(blue, EmbedTask()))
    search = batcher.submit(Job(red, SearchTask(k=1)))
    gate.pass_one()  # the add; the other three are handed over as one batch
    assert len(gate.held) == 1 and len(gate.held[0][0]) == 3
    skipped.cancel()  # the client hung up: the batch is with the runner, the item not live
    gate.pass_one()
    np.testing.assert_allclose(result_of(embed).prediction.embedding, embedding_of(blue), rtol=1e-6)
    assert [m.id for m in result_of(search).matches] == ["red"]
