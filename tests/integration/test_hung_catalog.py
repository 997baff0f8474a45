"""A PostgreSQL server that accepts connections and never answers (its processes stopped with
SIGSTOP, as a stalled disk or host leaves it: the kernel still completes TCP handshakes and
answers keepalives, and the server's own statement_timeout never fires): every catalog call
fails with CatalogUnavailable within the catalog's client-side bound, a call already waiting
when the server hangs included, and the same catalog works again once the server does.

Through two replicas on such a catalog, under a mixed stream of concurrent searches, reads by
id, adds and deletes while it hangs for 10 s: every search and read answers 200; every write
200, or 503 with Retry-After within the bound (connect + statement timeouts) and a margin;
/readyz stays 200 and says the catalog is unavailable, and why; once it answers again, both
replicas converge on the catalog by themselves with every acknowledged write in it, and a
SIGTERM then stops each cleanly within its drain timeout."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from batchserve.client import BatchserveError, Client, NewItem, Retry
from batchserve.storage.listener import ChangeListener
from batchserve.storage.postgres import CatalogUnavailable, PostgresCatalog
from batchserve.storage.postgres_schema import LOG_LOCK
from tests.integration.conftest import Server, start_server, stop_server, wait_until
from tests.integration.test_catalog_pg import DIM, item, waiting_advisory_locks
from tests.integration.test_replicas import applied_seq, index_size, photo
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


# -- through two replicas (`batchserve serve --catalog postgresql://...`) ---------------------

#: The servers' catalogs have the default timeouts (no flag shortens them): the bound on a
#: write is connect 2 s + statement 5 s.
SERVER_BOUND_S = 7.0
#: How long PostgreSQL hangs: past the bound, so that every replica finds it out.
HANG_S = 10.0
DRAIN_S = 10.0
#: Adds each replica acknowledges before the hang and after it: the stream's events.
ACKNOWLEDGED_AROUND_HANG = 2
#: Deletes each replica's writer may make, of items seeded for them.
DOOMED = 8
#: A guard on each phase of the stream and on convergence, not a pace.
PHASE_LIMIT_S = 60.0
#: Between a client's requests: a steady stream that leaves the two cores to the servers.
PAUSE_S = 0.05
PHOTOS = ("cat", "coffee", "rocket", "brick", "astronaut", "camera")


@dataclass(frozen=True)
class Answer:
    """One request of the stream: through which replica, what, how it was answered (0: no
    answer), its Retry-After, its error code, and how long it took."""

    replica: int
    kind: str
    item_id: str
    status: int
    retry_after_s: float | None
    code: str | None
    took_s: float


@dataclass
class Stream:
    """What the stream's clients saw, shared between their threads."""

    answers: list[Answer] = field(default_factory=list)
    #: Per replica: the ids its adds acknowledged (also read back through it).
    added: list[list[str]] = field(default_factory=lambda: [[], []])
    deleted: list[str] = field(default_factory=list)
    readyz: list[tuple[int, int, dict[str, str]]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ask(self, replica: int, kind: str, item_id: str, call: Callable[[], object]) -> int:
        """Make ``call``, a request through replica ``replica``, and record its answer."""
        started = time.monotonic()
        try:
            call()
        except BatchserveError as e:
            answer = Answer(replica, kind, item_id, e.status, e.retry_after_s, e.code, 0.0)
        else:
            answer = Answer(replica, kind, item_id, 200, None, None, 0.0)
        answer = replace(answer, took_s=time.monotonic() - started)
        with self.lock:
            self.answers.append(answer)
            if kind == "add" and answer.status == 200:
                self.added[replica].append(item_id)
            if kind == "delete" and answer.status == 200:
                self.deleted.append(item_id)
        return answer.status

    def acknowledged(self, replica: int) -> int:
        with self.lock:
            return len(self.added[replica])


def client_of(server: Server) -> Client:
    """A client that tries each call once: the test sees every 503 the server sends."""
    return Client(server.url, timeout_s=60.0, retries=Retry(attempts=1))


def searches(stream: Stream, replica: int, server: Server) -> None:
    with client_of(server) as client:
        for name in itertools.cycle(PHOTOS):
            if stream.done.is_set():
                return
            stream.ask(replica, "search", name, partial(client.search, photo(name), k=3))
            time.sleep(PAUSE_S)


def reads(stream: Stream, replica: int, server: Server, kept: list[str]) -> None:
    """Reads by id of the items every replica held before the hang, and of those this
    replica acknowledged since (in its memory too)."""
    with client_of(server) as client:
        for turn in itertools.count():
            if stream.done.is_set():
                return
            with stream.lock:
                known = kept + stream.added[replica]
            item_id = known[turn % len(known)]
            stream.ask(replica, "get", item_id, partial(client.get, item_id))
            time.sleep(PAUSE_S)


def writes(stream: Stream, replica: int, server: Server, doomed: list[str]) -> None:
    """Adds of new ids, and deletes of items seeded to be deleted (each tried once)."""
    with client_of(server) as client:
        for n in itertools.count():
            if stream.done.is_set():
                return
            new_id, name = f"add-{replica}-{n}", PHOTOS[n % len(PHOTOS)]
            stream.ask(replica, "add", new_id, partial(client.add, id=new_id, image=photo(name)))
            if n % 2 and doomed:
                gone = doomed.pop()
                stream.ask(replica, "delete", gone, partial(client.delete, gone))
            time.sleep(PAUSE_S)


def readyz(server: Server) -> tuple[int, dict[str, str]]:
    answer = server.request("GET", "/readyz", timeout_s=10.0)
    return answer.status, answer.json()


def unavailable_everywhere(stream: Stream, servers: list[Server]) -> bool:
    """Whether /readyz now says, on every replica, that the catalog is unavailable."""
    seen = []
    for i, server in enumerate(servers):
        status, body = readyz(server)
        with stream.lock:
            stream.readyz.append((i, status, body))
        seen.append(body.get("catalog") == "unavailable")
    return all(seen)


def test_two_replicas_under_load_on_a_hung_catalog_read_refuse_writes_in_time_and_converge(
    postgres: PostgresCluster, pg_url: str, tmp_path: Path
) -> None:
    args = (
        "--catalog", pg_url, "--no-demo", "--follow-interval-s", "0.5",
        "--drain-timeout-s", str(DRAIN_S), "--max-delay-s", "0.005",
    )  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda i: start_server(tmp_path / f"replica{i}", *args), (0, 1)))
    stopped: list[int] = []
    try:
        kept = [f"kept-{n}" for n in range(4)]
        doomed = [[f"doomed-{r}-{n}" for n in range(DOOMED)] for r in (0, 1)]
        with client_of(servers[0]) as seeder:
            seeds = [*kept, *doomed[0], *doomed[1]]
            seeder.add([NewItem(i, photo(PHOTOS[n % len(PHOTOS)])) for n, i in enumerate(seeds)])
        # Every replica holds the seeds in memory: the other follows the one that added them.
        target = applied_seq(servers[0])
        wait_until(lambda: applied_seq(servers[1]) >= target, "the seeds on both replicas")
        assert [readyz(s) for s in servers] == [(200, {"status": "ready", "catalog": "ok"})] * 2

        stream = Stream()
        clients = [
            threading.Thread(target=work, args=(stream, r, server, *extra), daemon=True)
            for r, server in enumerate(servers)
            for work, extra in ((searches, ()), (reads, (kept,)), (writes, (doomed[r],)))
        ]
        for client in clients:
            client.start()
        try:
            wait_until(
                lambda: min(stream.acknowledged(r) for r in (0, 1)) >= ACKNOWLEDGED_AROUND_HANG,
                "adds acknowledged through both replicas before the hang",
                timeout_s=PHASE_LIMIT_S,
            )
            with postgres.stopped():
                hung = time.monotonic()
                told = False
                while not told and time.monotonic() - hung < HANG_S:
                    told = unavailable_everywhere(stream, servers)
                    time.sleep(0.2)
                # The hang lasts HANG_S whatever /readyz said: the stream goes on meanwhile.
                time.sleep(max(0.0, HANG_S - (time.monotonic() - hung)))
            after = [stream.acknowledged(r) for r in (0, 1)]
            wait_until(
                lambda: all(
                    stream.acknowledged(r) >= after[r] + ACKNOWLEDGED_AROUND_HANG for r in (0, 1)
                ),
                "adds acknowledged through both replicas after the hang",
                timeout_s=PHASE_LIMIT_S,
            )
        finally:
            stream.done.set()
            for client in clients:
                client.join(timeout=SERVER_BOUND_S + 60)
        assert not any(client.is_alive() for client in clients)
        assert told, f"/readyz never said the catalog was unavailable: {stream.readyz[-4:]}"

        # During the hang: /readyz 200 on both, saying why.
        during = [(r, status, body) for r, status, body in stream.readyz]
        assert all(status == 200 for _r, status, _body in during), during
        reasons = {
            body.get("catalog_reason") for _r, _s, body in during if "catalog_reason" in body
        }
        # A hung server: no answer within the bound, or, for a call that found the pool's
        # connections all held by hung calls, no connection within its wait.
        assert reasons and all(
            r == "no answer within 7 s" or r.startswith("no connection within") for r in reasons
        ), during
        # Every search and read 200; every write 200, or 503 with Retry-After, in time.
        answers = stream.answers
        kinds = {kind: [a for a in answers if a.kind == kind] for kind in ("search", "get")}
        for kind, asked in kinds.items():
            failed = [a for a in asked if a.status != 200]
            assert asked and not failed, f"{kind}: {failed[:5]}"
        written = [a for a in answers if a.kind in ("add", "delete")]
        wrong = [a for a in written if a.status not in (200, 503)]
        assert not wrong, wrong[:5]
        slow = [a for a in written if a.took_s >= SERVER_BOUND_S + MARGIN_S]
        assert not slow, slow[:5]
        refused = [a for a in written if a.status == 503]
        assert refused, "no write was refused: the hang was not met"
        assert all(a.retry_after_s is not None for a in refused), refused[:5]
        assert {a.code for a in refused} == {"catalog_unavailable"}, refused[:5]

        # Both replicas converge on the catalog, every acknowledged write in it.
        dim = int(servers[0].request("GET", "/v1/index").json()["dim"])
        truth = PostgresCatalog(pg_url, dim)
        try:
            last = truth.last_seq()
            every = [a.item_id for a in answers] + seeds
            present = truth.ids(every)
        finally:
            truth.close()
        assert set(stream.added[0] + stream.added[1]) <= present
        assert not set(stream.deleted) & present
        wait_until(
            lambda: (
                [applied_seq(s) for s in servers] == [last, last]
                and [readyz(s)[1].get("catalog") for s in servers] == ["ok", "ok"]
            ),
            "both replicas following the catalog again",
            timeout_s=PHASE_LIMIT_S,
        )
        assert [index_size(s) for s in servers] == [len(present)] * 2
    finally:
        # SIGTERM: each drains and exits 0 within its drain timeout.
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            stopped = list(pool.map(stop_server, servers))
        took = time.monotonic() - started
    assert stopped == [0, 0], [s.log()[-3000:] for s in servers]
    assert took < DRAIN_S, took
