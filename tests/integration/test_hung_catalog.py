"""A PostgreSQL server that accepts connections and never answers (its processes stopped with
SIGSTOP, as a stalled disk or host leaves it: the kernel still completes TCP handshakes and
answers keepalives, and the server's own statement_timeout never fires): every catalog call
fails with CatalogUnavailable within the catalog's client-side bound, a call already waiting
when the server hangs included, and the same catalog works again once the server does.
Through a server on such a catalog: searches answer, writes get a 503 within the bound, the
replica follows the catalog again once it answers, and SIGTERM stops it cleanly in time."""

from __future__ import annotations

import importlib.resources
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import psycopg
import pytest

from batchserve.storage.listener import ChangeListener
from batchserve.storage.postgres import CatalogUnavailable, PostgresCatalog
from batchserve.storage.postgres_schema import LOG_LOCK
from batchserve.storage.records import NewItem
from tests.integration.conftest import Response, Server, start_server, stop_server, wait_until
from tests.integration.test_catalog_pg import DIM, item, waiting_advisory_locks
from tests.postgres import PostgresCluster

T = TypeVar("T")

#: Short timeouts, so that the bound (connect + statement) is 3 s.
CONNECT_S = 2.0
STATEMENT_S = 1.0
#: Scheduling and the pool's own bookkeeping on a shared machine.
MARGIN_S = 2.0


@pytest.fixture
def catalog(pg_url: str) -> Iterator[PostgresCatalog]:
    opened = PostgresCatalog(
        pg_url, DIM, connect_timeout_s=CONNECT_S, statement_timeout_s=STATEMENT_S
    )
    yield opened
    opened.close()


def fails_within_the_bound(
    catalog: PostgresCatalog, call: Callable[[], object]
) -> CatalogUnavailable:
    started = time.monotonic()
    with pytest.raises(CatalogUnavailable) as raised:
        call()
    took = time.monotonic() - started
    assert took < catalog.bound_s + MARGIN_S, f"{took:.2f} s: {raised.value.detail}"
    return raised.value


def recovers(call: Callable[[], T], within_s: float = 5.0) -> T:
    """``call``'s result once the pool has reconnected (a call that finds no connection
    ready while the catalog is failing is refused at once, prompting a reconnection)."""
    started = time.monotonic()
    while True:
        try:
            return call()
        except CatalogUnavailable:
            assert time.monotonic() - started < within_s, "the catalog did not recover"
            time.sleep(0.1)


def test_calls_on_a_hung_server_fail_within_the_bound_and_the_same_catalog_recovers(
    postgres: PostgresCluster, pg_url: str, catalog: PostgresCatalog
) -> None:
    assert catalog.bound_s == CONNECT_S + STATEMENT_S
    (fid0, _fid1), _ = catalog.upsert([item(0), item(1)])
    listener = ChangeListener(pg_url, connect_timeout_s=CONNECT_S, statement_timeout_s=STATEMENT_S)
    try:
        assert listener.wait(0.05) is True  # connected
        with postgres.stopped():
            first = fails_within_the_bound(catalog, lambda: catalog.upsert([item(2)]))
            assert "no answer from the server within 3 s" in first.detail
            # The pool has no connection left: the calls that follow are refused sooner.
            fails_within_the_bound(catalog, lambda: catalog.delete("id0"))
            fails_within_the_bound(catalog, lambda: catalog.get("id1"))
            started = time.monotonic()
            assert listener.wait(0.5) is False
            assert time.monotonic() - started < 0.5 + MARGIN_S
        recovers(lambda: catalog.upsert([item(2)]))
        assert catalog.delete("id0") == fid0
        got = catalog.get("id1")
        assert got is not None and got.id == "id1"
        assert catalog.ids(["id0", "id1", "id2"]) == {"id1", "id2"}
        assert listener.wait(5.0) is True  # the writes since were notified
    finally:
        listener.close()


def test_a_write_already_waiting_when_the_server_hangs_is_cut_at_the_bound(
    postgres: PostgresCluster, pg_url: str, catalog: PostgresCatalog
) -> None:
    catalog.upsert([item(0)])
    failed: list[CatalogUnavailable] = []

    def write() -> None:
        try:
            catalog.upsert([item(1)])
        except CatalogUnavailable as e:
            failed.append(e)

    writer = threading.Thread(target=write)
    with psycopg.connect(pg_url) as holder:
        # Another writer holds the log lock: the write waits for it in the server...
        holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", LOG_LOCK)
        writer.start()
        while waiting_advisory_locks(holder) == 0:
            time.sleep(0.01)
        # ... and the server stops, and its statement_timeout with it.
        with postgres.stopped():
            hung = time.monotonic()
            writer.join(timeout=catalog.bound_s + 10)
            took = time.monotonic() - hung
        holder.rollback()
    assert not writer.is_alive() and took < catalog.bound_s + MARGIN_S, took
    assert len(failed) == 1 and "no answer from the server" in failed[0].detail, failed
    recovers(lambda: catalog.upsert([item(1)]))
    assert catalog.ids(["id0", "id1"]) == {"id0", "id1"}


# -- through a server (`batchserve serve --catalog postgresql://...`) -------------------------

#: The server's catalog has the default timeouts: connect 2 s + statement 5 s.
SERVER_BOUND_S = 7.0
DRAIN_S = 10.0
JPEG = {"Content-Type": "image/jpeg"}


def photo(name: str) -> bytes:
    return importlib.resources.files("batchserve").joinpath(f"data/demo/{name}.jpg").read_bytes()


def add(server: Server, item_id: str) -> Response:
    return server.request("POST", f"/v1/items?id={item_id}", photo("cat"), JPEG)


def search(server: Server) -> Response:
    return server.request("POST", "/v1/search?k=1", photo("cat"), JPEG)


def test_a_server_on_a_hung_catalog_searches_refuses_writes_in_time_and_stops_cleanly(
    postgres: PostgresCluster, pg_url: str, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path, "--catalog", pg_url, "--no-demo",
        "--follow-interval-s", "0.5", "--drain-timeout-s", str(DRAIN_S),
    )  # fmt: skip
    try:
        assert add(server, "before").status == 200
        with postgres.stopped():
            assert search(server).status == 200
            writes: list[Callable[[], Response]] = [
                lambda: add(server, "during"),
                lambda: server.request("DELETE", "/v1/items/before"),
            ]
            for write in writes:
                started = time.monotonic()
                refused = write()
                took = time.monotonic() - started
                assert refused.status == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "catalog_unavailable"
                # Its own wait, or one of the follower's before it on the store thread.
                assert took < SERVER_BOUND_S + 2 * MARGIN_S, took
            found = search(server)
            assert found.status == 200
            assert found.json()["results"][0]["matches"][0]["id"] == "before"
        wait_until(lambda: add(server, "after").status == 200, "writes again", timeout_s=10)
        # A change committed elsewhere reaches the replica by itself.
        dim = int(server.request("GET", "/v1/index").json()["dim"])
        elsewhere = PostgresCatalog(pg_url, dim)
        try:
            vector = np.full(dim, 1 / np.sqrt(dim), np.float32)
            elsewhere.upsert([NewItem("elsewhere", vector, None, {})])
        finally:
            elsewhere.close()
        # In its index ("before", "after" and "elsewhere"): a read by id asks the catalog.
        wait_until(
            lambda: server.request("GET", "/v1/index").json()["size"] == 3,
            "the replica follows the catalog",
            timeout_s=10,
        )
    finally:
        started = time.monotonic()
        status = stop_server(server)
    assert status == 0, server.log()[-3000:]
    assert time.monotonic() - started < DRAIN_S
