"""The items of one add request are stored together or not at all, through the real server
graph (fake model, threads run at once): the request's images still go through the model as
separate items of the Batcher's batches, but every item is stored in the store stage of the
batch that embeds the last of them, in one catalog transaction; an image that fails, is
cancelled or passes its deadline, or a store that fails, leaves none of them stored."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock

from batchserve.config import ServerSettings, ServeSettings
from batchserve.errors import DeadlineExceeded, StorageFailed
from batchserve.models.batches import Prediction
from batchserve.models.images import DecodeLimits, decode_image
from batchserve.models.views import CROP_VIEWS
from batchserve.server import Threads, build
from batchserve.serving.batching import Batch, BatchPolicy
from batchserve.serving.records import AddTask
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore
from batchserve.testing import FakeModel, SyncModelRunner, encode_image, result_of, run_now

TIMEOUT_S = 0.5


def image(n: int) -> bytes:
    """The ``n``th image of a request: a colour of its own."""
    return encode_image(colour=(40 * n, 200 - 40 * n, 90))


class HeldModel(SyncModelRunner):
    """The model's thread, holding each batch until the test lets it through."""

    def __init__(self, model: FakeModel) -> None:
        super().__init__(model, loaded=False)
        self.held: list[tuple[Batch[npt.NDArray[np.uint8]], Deferred[Any]]] = []

    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]:
        d: Deferred[Sequence[Prediction | None]] = Deferred()
        self.held.append((batch, d))
        return d

    def pass_one(self) -> int:
        """Run the oldest batch held; its size."""
        batch, d = self.held.pop(0)
        super().run(batch).chainDeferred(d)
        return len(batch)


class StoreThread:
    """The store thread: runs each call at once, or keeps it while ``holding``."""

    def __init__(self) -> None:
        self.holding = False
        self.kept: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self.holding:
            return run_now(f, *args)
        d: Deferred[Any] = Deferred()
        self.kept.append((d, f, args))
        return d

    def release(self) -> None:
        self.holding = False
        while self.kept:
            d, f, args = self.kept.pop(0)
            run_now(f, *args).chainDeferred(d)


class Harness:
    """The server built by ``build`` with batches of at most two images."""

    def __init__(self, data_dir: Path, model: FakeModel | None = None) -> None:
        self.model = HeldModel(model or FakeModel())
        self.thread = StoreThread()
        self.reactor = MemoryReactorClock()
        settings = ServeSettings(
            server=ServerSettings(workers="0"),
            batching=BatchPolicy(max_batch_size=2, timeout_s=TIMEOUT_S),
            store=StoreSettings(data_dir=str(data_dir), demo=False),
        )
        self.server = build(
            settings, self.reactor, model=self.model, threads=Threads(run_now, self.thread)
        )
        assert result_of(self.server.start()) is None
        self.store: ItemStore = result_of(self.server.store.call(lambda store: store))

    def add(self, *ids: str) -> Deferred[list[str]]:
        """An add request of one image per id, each a colour of its own."""
        images = [image(n) for n in range(len(ids))]
        return self.server.service.add(
            lambda: [(image, AddTask(item)) for image, item in zip(images, ids, strict=True)]
        )

    def stored(self) -> list[str]:
        return sorted(item.id for item in self.store.catalog.page(100, None))


def test_an_add_spread_over_two_batches_is_committed_in_one_transaction(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    commits = h.store.catalog.commits
    d = h.add("a", "b", "c")
    assert h.model.pass_one() == 1  # the model was idle: the first image went alone
    assert h.stored() == [] and h.store.catalog.commits == commits
    assert h.model.pass_one() == 2  # the other two in the next batch
    assert result_of(d) == ["a", "b", "c"]
    assert h.stored() == ["a", "b", "c"]
    assert h.store.catalog.commits == commits + 1


def test_a_storage_failure_stores_none_of_the_request_and_leaves_other_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    other = h.add("other")  # alone in the first batch
    d = h.add("a", "b", "c")  # a and b in the second batch, c in the third
    h.model.pass_one()
    assert result_of(other) == ["other"]
    h.model.pass_one()
    assert h.stored() == ["other"]  # a and b embedded, waiting for c

    def disk_full(_items: Sequence[NewItem]) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(h.store.catalog, "upsert", disk_full)
    h.model.pass_one()
    assert result_of(d).check(StorageFailed)
    monkeypatch.undo()
    assert h.stored() == ["other"]
    assert h.store.index.size == 1


def test_an_image_past_the_deadline_fails_the_request_and_stores_none_of_it(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    d = h.add("a", "b", "c")
    h.model.pass_one()  # a is embedded; b and c wait in the next batch, held by the model
    h.reactor.advance(TIMEOUT_S + 0.1)
    assert result_of(d).check(DeadlineExceeded)
    h.model.pass_one()  # the model finishes b and c all the same
    assert h.stored() == [] and h.store.index.size == 0


def test_a_cancelled_request_stores_none_of_its_items(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    d = h.add("a", "b", "c")
    h.model.pass_one()
    d.cancel()  # the client hung up with a embedded, b and c with the model
    assert result_of(d).check(CancelledError)
    h.model.pass_one()
    assert h.stored() == []


def test_a_request_that_fails_while_its_adds_wait_for_the_store_stores_none_of_them(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    h.thread.holding = True  # the first batch's store stage stays on the store thread
    first = h.add("first")
    d = h.add("a")
    h.model.pass_one()
    h.model.pass_one()  # a is embedded; its store stage waits for the first batch's
    d.cancel()
    h.thread.release()
    assert result_of(first) == ["first"]
    assert result_of(d).check(CancelledError)
    assert h.stored() == ["first"]


def test_the_items_of_a_request_are_stored_each_with_its_own_views(tmp_path: Path) -> None:
    model = FakeModel(crop_views=True)
    h = Harness(tmp_path, model)
    d = h.add("a", "b")
    while h.model.held:  # twelve images (two items and their five views) in batches of two
        assert h.stored() == []
        h.model.pass_one()
    assert result_of(d) == ["a", "b"]
    for n, item in enumerate(["a", "b"]):
        pixels = decode_image(image(n), model.info.input_size, DecodeLimits())
        alone = model.predict(pixels[None]).embeddings[0]
        found = h.store.catalog.embedding(item)
        assert found is not None
        (_fids, vectors), *_rest = list(h.store.catalog.vectors([found[0]]))
        assert vectors.shape == (1, 1 + CROP_VIEWS, model.info.dim)
        # A plain colour: its views look like the whole image, and like no other item.
        np.testing.assert_allclose(vectors[0], np.tile(alone, (1 + CROP_VIEWS, 1)), atol=1e-6)
