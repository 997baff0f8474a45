"""Waking a follower of the shared catalog's change log: PostgreSQL LISTEN/NOTIFY on a
connection of its own, every wait bounded on the client side."""

from __future__ import annotations

import time

import psycopg
from psycopg.rows import TupleRow

from batchserve.storage.postgres_schema import CHANNEL, KEEPALIVES, libpq_timeout_s
from batchserve.storage.watchdog import Watchdog


class ChangeListener:
    """Wakes a follower of the change log when any process commits a change: a dedicated
    autocommit connection listening on ``CHANNEL``, opened by the first ``wait`` (on the
    waiting thread, not the constructor's) and reopened after errors.

    For one thread: ``wait`` and ``close`` are called by the thread that follows the log.
    No call blocks past about ``connect_timeout_s + statement_timeout_s`` (or its
    ``timeout_s``), even when the server is stopped: a wait for notifications ends on the
    client side, and ``LISTEN`` is cut by a watchdog.
    """

    def __init__(
        self, url: str, connect_timeout_s: float = 2.0, statement_timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self._connect_timeout_s = libpq_timeout_s(connect_timeout_s)
        self._watchdog = Watchdog(
            self._connect_timeout_s + statement_timeout_s, "batchserve-listen-watchdog"
        )
        self._conn: psycopg.Connection[TupleRow] | None = None

    def _connect(self) -> bool:
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self._connect_timeout_s,
                application_name="batchserve-listener",
                **KEEPALIVES,
            )
        except psycopg.OperationalError:
            return False
        try:
            with self._watchdog.watching(conn):
                conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.OperationalError:
            conn.close()
            return False
        self._conn = conn
        return True

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a change. True when one was notified, or when the
        connection was just opened (changes before it were not notified: read the log);
        False on timeout, and while PostgreSQL is unreachable (after waiting out
        ``timeout_s``, so that a caller's loop does not spin)."""
        deadline = time.monotonic() + timeout_s
        if self._conn is None:
            if self._connect():
                return True
            time.sleep(max(0.0, deadline - time.monotonic()))
            return False
        try:
            received = sum(1 for _ in self._conn.notifies(timeout=timeout_s, stop_after=1))
            if received:
                # Several commits wake a follower once: it reads the whole log anyway.
                sum(1 for _ in self._conn.notifies(timeout=0.0))
        except psycopg.OperationalError:
            self.close()
            return False
        return received > 0

    def close(self) -> None:
        """Close the connection (``wait`` opens another); a thread that follows the log
        calls it once more when it stops."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._watchdog.close()
