"""A rolling restart loses no request: two replicas behind nginx (deploy/local-cluster and
deploy/nginx/batchserve.conf), a steady stream of searches and adds from a few clients
through nginx while ``deploy/local-cluster restart`` restarts the replicas one by one. Every
answer is a 2xx, no client sees a connection error, and every add acknowledged is readable
afterwards, through nginx and on each replica."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.conftest import http_request, wait_until
from tests.integration.test_local_cluster import (
    READY_TIMEOUT_S,
    local_cluster,
    logs_of,
    started_cluster,
)

DEMO = Path(__file__).resolve().parents[2] / "batchserve" / "data" / "demo"
PHOTOS = [DEMO / name for name in ("cat.jpg", "brick.jpg", "retina.jpg")]

REPLICAS = 2
#: Clients sending one request after another, each pausing this long between them: a steady
#: stream that the one replica left during a restart serves without its queue filling up.
CLIENTS = 3
PAUSE_S = 0.1
#: Traffic before the restart begins and after it ends.
MARGIN_S = 1.0
#: restart: per replica, its drain, its start (the model loads in ~10 s here) and nginx's
#: fail_timeout (10 s) at most.
RESTART_TIMEOUT_S = 150
#: How long an add through one replica may take to be read on the other.
REPLICATION_TIMEOUT_S = 10.0


@dataclass
class Running:
    directory: Path
    port: int

    def replica_ports(self) -> list[int]:
        return [
            int((self.directory / "run" / f"replica-{i}.port").read_text())
            for i in range(1, REPLICAS + 1)
        ]


@pytest.fixture
def cluster() -> Iterator[Running]:
    with started_cluster("batchserve-rolling-") as (directory, port):
        yield Running(directory, port)


@dataclass
class Tally:
    """What the clients saw: a count per (operation, status), every failure, the adds
    acknowledged."""

    sent: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(port: int, number: int, dim: int, stop: threading.Event, tally: Tally) -> None:
    """Searches (by photo and by vector) and adds, one after another, on one keep-alive
    connection to nginx (a new one after nginx closes it)."""
    photos = [p.read_bytes() for p in PHOTOS]
    vector = json.dumps({"vectors": [[1.0] + [0.0] * (dim - 1)]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = 0
    try:
        while not stop.is_set():
            photo = photos[sent % len(photos)]
            kind = ("add", "search", "search-vector")[sent % 3]
            item_id = f"rolling-{number}-{sent}"
            if kind == "add":
                path, body, ctype = f"/v1/items?id={item_id}", photo, "image/jpeg"
            elif kind == "search":
                path, body, ctype = "/v1/search?k=3", photo, "image/jpeg"
            else:
                path, body, ctype = "/v1/search?k=3", vector, "application/json"
            sent += 1
            with tally.lock:
                tally.sent += 1
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                response = conn.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as e:
                with tally.lock:
                    tally.failures.append(f"connection error on {kind}: {e!r}")
                conn.close()
                continue
            with tally.lock:
                tally.statuses[kind, response.status] += 1
                if not 200 <= response.status < 300:
                    tally.failures.append(f"{kind} {response.status}: {answer[:200]!r}")
                elif kind == "add":
                    tally.added.append(item_id)
            time.sleep(PAUSE_S)
    finally:
        conn.close()


def retried_by_nginx(access_log: Path) -> Counter[str]:
    """The requests nginx tried on more than one replica, by the first replica tried (its
    log lists each one it tried)."""
    upstreams = [json.loads(line)["upstream"] for line in access_log.read_text().splitlines()]
    return Counter(tried.split(", ")[0] for tried in upstreams if ", " in tried)


def readable(port: int, item_id: str) -> bool:
    return http_request(port, "GET", f"/v1/items/{item_id}", timeout_s=30).status == 200


def test_a_rolling_restart_behind_nginx_fails_no_request(cluster: Running) -> None:
    before = cluster.replica_ports()
    model = http_request(cluster.port, "GET", "/v1/model", timeout_s=30)
    assert model.status == 200, model.body
    dim = int(model.json()["dim"])

    tally, stop = Tally(), threading.Event()
    clients = [
        threading.Thread(target=client, args=(cluster.port, n, dim, stop, tally), daemon=True)
        for n in range(CLIENTS)
    ]
    started = time.monotonic()
    for thread in clients:
        thread.start()
    try:
        time.sleep(MARGIN_S)
        restarted = local_cluster(
            "restart", "--dir", str(cluster.directory), "--ready-timeout-s",
            str(READY_TIMEOUT_S), timeout_s=RESTART_TIMEOUT_S,
        )  # fmt: skip
        time.sleep(MARGIN_S)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    streamed_s = time.monotonic() - started
    assert restarted.returncode == 0, (
        restarted.stdout + restarted.stderr + logs_of(cluster.directory)
    )
    assert restarted.stdout.count("nginx sends requests to replica-") == REPLICAS

    retried = retried_by_nginx(cluster.directory / "logs" / "nginx-access.log")
    summary = (
        f"{tally.sent} requests in {streamed_s:.1f} s, {len(tally.failures)} failed, "
        f"{sum(retried.values())} retried by nginx: {dict(tally.statuses)}"
    )
    print(summary, restarted.stdout, sep="\n")
    assert not tally.failures, summary + "\n" + "\n".join(tally.failures[:20])
    # The stream met each replica while it was down, and nginx sent those requests on.
    assert set(retried) == {f"127.0.0.1:{port}" for port in before}, (summary, retried)
    assert tally.statuses["add", 200] >= 30 and tally.statuses["search", 200] >= 30, summary
    # Each replica is a new process on its old port (nginx's config is unchanged).
    assert cluster.replica_ports() == before

    for item_id in tally.added:
        assert readable(cluster.port, item_id), item_id
    for port in before:
        wait_until(
            lambda port=port: all(readable(port, item_id) for item_id in tally.added[-5:]),
            f"replica on {port} to read the last adds",
            timeout_s=REPLICATION_TIMEOUT_S,
        )
        missing = [item_id for item_id in tally.added if not readable(port, item_id)]
        assert not missing, f"replica on {port} misses {len(missing)} adds: {missing[:5]}"
