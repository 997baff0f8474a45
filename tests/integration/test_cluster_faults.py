"""Faults in a local cluster (deploy/local-cluster: PostgreSQL, two replicas, nginx, all on
127.0.0.1), under a stream of requests through nginx: a replica SIGKILLed mid-stream loses
no acknowledged write (the survivor and the restarted replica hold every one), and clients
see only success, a clear 5xx or a lost connection, never a wrong answer; PostgreSQL
stopped and started mid-stream: reads never fail, writes get 503 and then succeed, and no
replica crashes. Each stream is paced by events, not seconds: the fault comes once writes
were acknowledged, and the stream ends once every client made requests after it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import start_server, stop_server, wait_until
from tests.integration.test_local_cluster import PHOTO, Cluster
from tests.integration.test_local_cluster import cluster as cluster  # the fixture

JPEG = {"Content-Type": "image/jpeg"}
#: Writes acknowledged before the fault is done, and requests each client makes after it.
BEFORE_FAULT, AFTER_FAULT = 5, 3
#: A stream that has not reached those events by then has failed (a guard, not a pace).
STREAM_LIMIT_S = 150.0


@dataclass
class Outcomes:
    acknowledged: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # 5xx statuses with a JSON error
    lost: int = 0  # connections that broke
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def write(cluster: Cluster, item_id: str, out: Outcomes) -> None:
    try:
        done = cluster.via_nginx("POST", f"/v1/items?id={item_id}", PHOTO.read_bytes(), **JPEG)
    except OSError:
        with out.lock:
            out.lost += 1
        return
    with out.lock:
        if done.status == 200 and done.json().get("added") == [item_id]:
            out.acknowledged.append(item_id)
        elif done.status >= 500 and "error" in done.json():
            out.refused.append(done.status)
        else:
            out.wrong.append(f"{item_id}: {done.status} {done.body[:200]!r}")


def stream(
    cluster: Cluster,
    prefix: str,
    fault: Callable[[], None],
    workers: int = 4,
    until: Callable[[], bool] = lambda: True,
) -> Outcomes:
    """``workers`` clients writing new items through nginx: ``fault`` is done once
    BEFORE_FAULT writes were acknowledged, and each client stops once it has begun
    AFTER_FAULT requests since (and ``until()`` holds)."""
    out = Outcomes()
    deadline = time.monotonic() + STREAM_LIMIT_S
    counter = itertools.count()
    acknowledged, faulted = threading.Event(), threading.Event()
    finished: list[int] = []

    def client() -> None:
        after = 0
        while time.monotonic() < deadline:
            if faulted.is_set():
                if after >= AFTER_FAULT and until():
                    with out.lock:
                        finished.append(after)
                    return
                after += 1
            try:
                write(cluster, f"{prefix}-{next(counter)}", out)
            except ValueError as e:  # an answer that is not JSON
                with out.lock:
                    out.wrong.append(repr(e))
            if len(out.acknowledged) >= BEFORE_FAULT:
                acknowledged.set()

    threads = [threading.Thread(target=client) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        assert acknowledged.wait(STREAM_LIMIT_S), f"no {BEFORE_FAULT} writes acknowledged: {out}"
        fault()
    finally:
        faulted.set()
        for t in threads:
            t.join(timeout=STREAM_LIMIT_S + 60)
    assert len(finished) == workers, f"the clients did not get past the fault: {out}"
    return out


def catalog_url(cluster: Cluster) -> str:
    return (cluster.directory / "run" / "catalog-url").read_text().strip()


def has(port: int, cluster: Cluster, item_id: str) -> bool:
    return cluster.request(port, "GET", f"/v1/items/{item_id}").status == 200


def test_a_replica_killed_mid_stream_loses_no_acknowledged_write(
    cluster: Cluster, tmp_path: Path
) -> None:
    victim = cluster.directory / "run" / "replica-2.pid"
    pid = int(victim.read_text())
    out = stream(cluster, "kill", lambda: os.kill(pid, signal.SIGKILL))
    print(f"SIGKILL: {len(out.acknowledged)} acknowledged, refused {out.refused}, lost {out.lost}")
    assert out.wrong == [] and len(out.acknowledged) >= BEFORE_FAULT, out
    survivor = cluster.replica_ports[0]
    wait_until(lambda: all(has(survivor, cluster, i) for i in out.acknowledged), "survivor")
    restarted = start_server(
        tmp_path,
        "--catalog", catalog_url(cluster),
        "--data-dir", str(cluster.directory / "replica-2"),
        "--no-demo",
    )  # fmt: skip
    try:
        missing = [i for i in out.acknowledged if not has(restarted.port, cluster, i)]
        assert missing == []  # ready means caught up with the catalog
    finally:
        stop_server(restarted)


def test_postgresql_stopped_mid_stream_fails_writes_with_503_never_reads(
    cluster: Cluster,
) -> None:
    survivor = cluster.replica_ports[0]
    reads: list[int] = []
    down = threading.Event()  # PostgreSQL stopped, until the stream ends
    reads_while_down: list[int] = []
    stop_reading = threading.Event()

    def reader() -> None:
        while not stop_reading.is_set():
            during = down.is_set()
            done = cluster.request(survivor, "POST", "/v1/search?k=3", PHOTO.read_bytes(), JPEG)
            reads.append(done.status)
            if during:
                reads_while_down.append(done.status)

    def stop_postgres() -> None:
        pg("stop", "-m", "fast")
        down.set()

    pg = pg_ctl(cluster)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        out = stream(
            cluster, "outage", stop_postgres, workers=2, until=lambda: len(reads_while_down) >= 3
        )
    finally:
        pg("start")
        stop_reading.set()
        thread.join(timeout=60)
    print(f"outage: {len(reads)} reads {set(reads)}, {len(out.acknowledged)} writes acknowledged,"
          f" refused {len(out.refused)} ({set(out.refused)}), lost {out.lost}")  # fmt: skip
    assert set(reads) == {200} and len(reads_while_down) >= 3
    assert out.wrong == [] and 503 in out.refused, out
    wait_until(lambda: write_ok(cluster, "after-outage"), "writes again", timeout_s=30)
    assert cluster.request(survivor, "GET", "/readyz").status == 200


def write_ok(cluster: Cluster, item_id: str) -> bool:
    out = Outcomes()
    write(cluster, item_id, out)
    return out.acknowledged == [item_id]


def pg_ctl(cluster: Cluster) -> Callable[..., None]:
    """Run pg_ctl on the cluster's PostgreSQL, as its own user when this is root."""
    from tests.postgres import require_postgres

    data = cluster.directory / "pg"
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    bindir = require_postgres()

    def run(action: str, *args: str) -> None:
        command = [*as_user, str(bindir / "pg_ctl"), action, "-D", str(data), "-w", *args]
        if action == "start":  # at the port the replicas know
            port = (cluster.directory / "run" / "postgres.port").read_text().strip()
            command += ["-o", f"-p {port}", "-l", str(cluster.directory / "logs" / "postgres.log")]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    return run


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < 300
