"""A replica's index follows a shared catalog: polled on the reactor's clock, poked by
notifications, one pass at a time, its lag reported, an outage logged once; the polls, not the
notified passes, record how far it applied the log and prune it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from batchserve.errors import NotReady
from batchserve.serving.follower import Follower
from batchserve.serving.pipeline import StoreWorker
from batchserve.testing import result_of, run_now
from tests.unit.test_store import SharedCatalog, follower, items, shared_store, store


class Lag:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def catalog_lag(self, changes: int) -> None:
        self.seen.append(changes)


def worker_for(replica: Any) -> StoreWorker:
    worker = StoreWorker(lambda: replica, run_now)
    result_of(worker.start())
    return worker


def test_the_follower_polls_the_catalog_and_reports_its_lag(tmp_path: Path) -> None:
    writer = store(tmp_path / "writer")
    replica = follower(tmp_path, writer)
    clock, lag = Clock(), Lag()
    follow = Follower(worker_for(replica), clock, 1.0, lag)
    follow.start()
    writer.add(items(0, 3))
    clock.advance(0.5)
    assert replica.index.size == 0  # not yet its turn
    clock.advance(0.5)
    assert replica.index.size == 3 and lag.seen == [0]
    writer.delete("id1")
    follow.poke()  # a notification: at once, without waiting for the poll
    assert replica.index.size == 2 and lag.seen == [0, 0]
    follow.stop()
    writer.add(items(5, 1))
    clock.advance(5.0)
    assert replica.index.size == 2


class HeldIndex:
    """An index thread whose calls finish only when the test says, failing or not."""

    def __init__(self) -> None:
        self.ready = True
        self.calls: list[Any] = []

    def call(self, fn: Any, *args: Any) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.calls.append(d)
        return d


def test_one_pass_at_a_time_and_one_more_when_poked_meanwhile() -> None:
    index = HeldIndex()
    follow = Follower(index, Clock(), 1.0)  # type: ignore[arg-type]
    follow.poke()
    follow.poke()
    follow.poke()
    assert len(index.calls) == 1
    index.calls[0].callback(0)
    assert len(index.calls) == 2  # the pokes meanwhile: one more pass
    index.calls[1].callback(0)
    assert len(index.calls) == 2


def test_an_unreachable_catalog_is_logged_once_and_retried() -> None:
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        index = HeldIndex()
        follow = Follower(index, Clock(), 1.0)  # type: ignore[arg-type]
        for _ in range(3):
            follow.poke()
            index.calls[-1].errback(NotReady("catalog down"))
        follow.poke()
        index.calls[-1].callback(0)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    messages = [
        e.get("log_format", "")
        for e in seen
        if e.get("log_namespace") == "batchserve.serving.follower"
    ]
    assert messages == [
        "cannot follow the shared catalog: {error}",
        "the shared catalog is reachable again; the index is following it",
    ]


def test_the_polls_record_the_replica_and_prune_the_log_and_notified_passes_do_not(
    tmp_path: Path,
) -> None:
    catalog = SharedCatalog(tmp_path / "shared.sqlite3")
    writer = shared_store(tmp_path / "writer", catalog)
    replica = shared_store(tmp_path / "replica", catalog)
    clock = Clock()
    follow = Follower(worker_for(replica), clock, 1.0)
    follow.start()
    opened = len(catalog.recorded)
    writer.add(items(0, 3))
    follow.poke()  # a notification: applied, nothing recorded or pruned
    assert replica.index.size == 3 and len(catalog.recorded) == opened
    assert len(catalog.changes_since(0)) == 3
    clock.advance(1.0)
    assert catalog.recorded[opened:] == [(replica.replica_id, 3)]
    assert catalog.pruned_seq() == 3 and catalog.changes_since(3) == []
    writer.add(items(3, 2))
    clock.advance(1.0)  # each poll: applied, recorded, pruned
    assert catalog.recorded[-1] == (replica.replica_id, 5) and catalog.pruned_seq() == 5
    assert replica.index.size == 5 and replica.rebuilt_behind_horizon == 0
    follow.stop()
