"""A client-side bound on every wait on PostgreSQL: a connection that does not answer in
time has its socket shut down, so that the call blocked on it fails at once. Used by the
PostgreSQL catalog (postgres.py) on its store thread and its change listener; the cutting
runs on one thread of its own."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

log = logging.getLogger(__name__)


class NoAnswer(psycopg.OperationalError):
    """The server did not answer in time: ``Watchdog`` cut the connection."""


class Watchdog:
    """Bounds waits on PostgreSQL on the client side: while a connection is watched, if it
    has not finished within ``bound_s`` of being watched (or of the last ``renew``), its
    socket is shut down, so that the call blocked on it fails at once with an error and the
    connection is discarded. The server's own ``statement_timeout`` cannot do this when its
    process is stopped or hung (``kill -STOP``, a stalled disk), nor can psycopg's cancel
    (a cancel request is one more connection nobody accepts), and TCP keepalives go on
    succeeding because the kernel answers them. One thread, started by the first watch
    (after ``close`` too).
    """

    def __init__(self, bound_s: float, name: str = "batchserve-pg-watchdog") -> None:
        self.bound_s = bound_s
        self._name = name
        self._cond = threading.Condition()
        #: id(connection) -> its watch; at most a pool's worth of entries.
        self._watched: dict[int, _Watch] = {}
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None
        #: Connections cut since created.
        self.cuts = 0

    @contextmanager
    def watching(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Bound the waits on ``conn`` inside the block; a driver error of a connection so
        cut is re-raised as ``NoAnswer``."""
        watch = _Watch(os.dup(conn.pgconn.socket), time.monotonic() + self.bound_s)
        with self._cond:
            self._watched[id(conn)] = watch
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            if watch.deadline < self._wake_at:
                self._cond.notify()
        try:
            yield
        except psycopg.Error as e:
            if watch.cut:
                raise NoAnswer(
                    f"no answer from the server within {self.bound_s:g} s (stopped or hung?): "
                    "the connection was cut on the client side"
                ) from e
            raise
        finally:
            with self._cond:
                del self._watched[id(conn)]
                os.close(watch.fd)

    def renew(self, conn: psycopg.Connection[Any]) -> None:
        """A new wait begins on ``conn`` (a statement, a commit): ``bound_s`` from now."""
        with self._cond:
            self._watched[id(conn)].deadline = time.monotonic() + self.bound_s

    @contextmanager
    def paused(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Not waiting on ``conn`` inside the block (a reader's iterator handed out rows);
        renewed after it."""
        with self._cond:
            self._watched[id(conn)].deadline = math.inf
        try:
            yield
        finally:
            self.renew(conn)

    def close(self) -> None:
        """Stop the thread (when nothing is watched)."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                now = time.monotonic()
                for watch in self._watched.values():
                    if watch.deadline <= now and not watch.cut:
                        watch.cut_off()
                        self.cuts += 1
                self._wake_at = min(
                    (w.deadline for w in self._watched.values() if not w.cut), default=math.inf
                )
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


class _Watch:
    """A watched connection: a duplicate of its socket's descriptor (so that cutting it
    never touches a descriptor number reused since) and when to cut it."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.cut = False

    def cut_off(self) -> None:
        self.cut = True
        sock = socket.socket(fileno=os.dup(self.fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected: the blocked call fails by itself
        finally:
            sock.close()
        log.debug("cut a connection to the catalog that did not answer in time")
