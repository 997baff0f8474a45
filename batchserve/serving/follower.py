"""Keeping a replica's index current with a shared catalog: its change log is applied on
the store thread every ``interval_s`` (polling, the fallback), and at once when the
catalog notifies a change (PostgreSQL LISTEN/NOTIFY, on a thread of its own). The periodic
passes, not the notified ones, also record in the catalog how far this replica has applied
its log and prune what every live replica has applied, past the catalog's retention
(``ItemStore.prune_change_log``), off the write path. How far behind the index is goes to
the metrics; an unreachable catalog is logged once, and the follower goes on trying until it
is back."""

from __future__ import annotations

import threading
from typing import Protocol

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from batchserve.serving.pipeline import StoreWorker
from batchserve.storage.store import ItemStore

log = Logger()


class LagObserver(Protocol):
    def catalog_lag(self, changes: int) -> None: ...


class Notifications(Protocol):
    """Wakes the follower: ``wait`` returns True when the catalog announced a change."""

    def wait(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...


def _follow(store: ItemStore, prune: bool) -> int:
    store.catch_up()
    if prune:
        store.prune_change_log()
    return store.behind()


class Follower:
    """Applies the shared catalog's changes to the index, one pass at a time."""

    def __init__(
        self,
        store: StoreWorker,
        clock: IReactorTime,
        interval_s: float,
        observer: LagObserver | None = None,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._observer = observer
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._running = False
        self._again = False
        #: A periodic pass is due: the next pass also prunes the change log.
        self._prune = False
        self._failing = False

    def start(self) -> None:
        self._loop.start(self._interval_s, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        self._prune = True
        self.poke()

    def poke(self) -> None:
        """Apply what the catalog holds now (once more after the pass under way, if any)."""
        if self._running:
            self._again = True
            return
        if not self._store.ready:
            return
        self._running, self._again = True, False
        prune, self._prune = self._prune, False
        d = self._store.call(_follow, prune)
        d.addCallbacks(self._done, self._failed)

    def _done(self, behind: int) -> None:
        if self._failing:
            log.info("the shared catalog is reachable again; the index is following it")
        self._failing = False
        if self._observer is not None:
            self._observer.catalog_lag(behind)
        self._finish()

    def _failed(self, failure: Failure) -> None:
        if not self._failing:
            log.warn("cannot follow the shared catalog: {error}", error=failure.value)
        self._failing = True
        self._finish()

    def _finish(self) -> None:
        self._running = False
        if self._again:
            self.poke()


def listen(
    notifications: Notifications, reactor: IReactorFromThreads, follower: Follower
) -> threading.Event:
    """Poke ``follower`` on the reactor whenever ``notifications`` arrive, on a daemon
    thread; set the returned event to stop it."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            if notifications.wait(1.0):
                reactor.callFromThread(follower.poke)
        notifications.close()

    threading.Thread(target=run, name="batchserve-listen", daemon=True).start()
    return stop
