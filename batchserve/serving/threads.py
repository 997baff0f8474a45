"""Threads that carry their name into the kernel, so that ``top -H``, ``ps -L`` and
/proc/<pid>/task/*/comm tell the reactor, the decode pool, the index thread and the model's
thread apart (Python names its threads only for itself). Linux only; elsewhere, and for
names the kernel refuses, the thread runs unnamed."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from batchserve.serving.turns import REQUESTS_PER_TURN, DecodeTurns

#: Runs a blocking function on a thread pool: ``run(f, *args) -> Deferred``.
PoolRunner = Callable[..., Deferred[Any]]

#: prctl's option to set the calling thread's name (at most 15 bytes are kept).
_PR_SET_NAME = 15

_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def name_this_thread(name: str) -> bool:
    """Give the calling thread ``name`` in the kernel (its first 15 bytes); whether it took."""
    if _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0)


def lower_this_thread(nice: int) -> bool:
    """Raise the calling thread's niceness by ``nice`` (Linux schedules threads on their
    own); whether it took."""
    if not nice or not sys.platform.startswith("linux"):
        return False
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, current + nice))
    except OSError:
        return False
    return True


class KernelNamedThread(threading.Thread):
    """A ``threading.Thread`` that names itself in the kernel once it runs, and lowers its
    priority by ``nice``. Twisted's pool names its threads "PoolThread-<pool>-<n>"; the
    kernel keeps 15 bytes, which should say which pool ("batchserve-deco")."""

    nice = 0

    def run(self) -> None:
        name_this_thread(self.name.removeprefix("PoolThread-"))
        lower_this_thread(self.nice)
        super().run()


class NamedThreadPool(ThreadPool):
    """A Twisted ThreadPool whose threads the kernel knows by the pool's name, run ``nice``
    steps below the process's priority."""

    def __init__(self, minthreads: int, maxthreads: int, name: str, nice: int = 0) -> None:
        super().__init__(minthreads, maxthreads, name)

        class PoolThread(KernelNamedThread):
            pass

        PoolThread.nice = nice
        self.threadFactory = PoolThread


@dataclass
class Threads:
    """Where blocking work runs: ``decode(f, *args)`` on the decode pool (reading bodies,
    decoding images), ``store(f, *args)`` on the one store thread (it owns the item store
    and its index). Both return Deferreds that fire on the reactor. The decode pool has a
    thread for each request being read and decoded, up to ``REQUESTS_PER_TURN`` per decode
    thread; ``turns`` lets as many images decode at once as there are decode threads, in
    turn (serving/turns.py)."""

    decode: PoolRunner
    store: PoolRunner
    pools: Sequence[ThreadPool] = ()
    turns: DecodeTurns | None = None

    @classmethod
    def pools_for(
        cls, reactor: IReactorFromThreads, decode_threads: int, decode_nice: int = 0
    ) -> Threads:
        decode = _decode_pool(decode_threads, decode_nice)
        store = NamedThreadPool(1, 1, name="batchserve-store")
        return cls(
            partial(deferToThreadPool, reactor, decode),
            partial(deferToThreadPool, reactor, store),
            (decode, store),
            DecodeTurns(decode_threads),
        )

    @classmethod
    def decode_only(
        cls, reactor: IReactorFromThreads, decode_threads: int, decode_nice: int = 0
    ) -> Threads:
        """The decode pool alone (an edge process: its store thread is the core's)."""
        decode = _decode_pool(decode_threads, decode_nice)
        return cls(
            partial(deferToThreadPool, reactor, decode),
            _no_store,
            (decode,),
            DecodeTurns(decode_threads),
        )

    def start(self) -> None:
        for pool in self.pools:
            pool.start()

    def stop(self) -> None:
        for pool in self.pools:
            pool.stop()


def _decode_pool(decode_threads: int, decode_nice: int) -> NamedThreadPool:
    return NamedThreadPool(
        decode_threads,
        decode_threads * REQUESTS_PER_TURN,
        name="batchserve-decode",
        nice=decode_nice,
    )


def _no_store(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return fail(RuntimeError("an edge process has no store thread"))
