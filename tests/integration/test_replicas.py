"""Replicas on one shared PostgreSQL catalog, each with its own index, started as a user
would (`batchserve serve --catalog postgresql://...`): an item added or deleted through one
is found (or gone) through the other within a bound; concurrent adds of distinct and
clashing ids converge to the same contents everywhere; with PostgreSQL down, searches and
reads by id go on (from memory) and writes get a prompt 503 with Retry-After; it comes back
and nothing acknowledged is lost; a restarted replica starts from its snapshot and replays
the rest."""

from __future__ import annotations

import importlib.resources
import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.integration.conftest import Server, start_server, stop_server
from tests.postgres import PostgresCluster

CONVERGE_S = 15.0
JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def catalog(postgres: PostgresCluster) -> str:
    return postgres.create_database()


def replica(directory: Path, catalog: str) -> Server:
    return start_server(
        directory, "--catalog", catalog, "--follow-interval-s", "0.5", "--max-delay-s", "0.005"
    )


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, catalog: str) -> Iterator[list[Server]]:
    with ThreadPoolExecutor(2) as pool:  # at the same moment, on an empty database
        started = list(
            pool.map(lambda i: replica(tmp_path_factory.mktemp(f"replica{i}"), catalog), (1, 2))
        )
    yield started
    for running in started:
        stop_server(running)


def photo(name: str) -> bytes:
    return importlib.resources.files("batchserve").joinpath(f"data/demo/{name}.jpg").read_bytes()


def eventually(check: Callable[[], bool], what: str, within_s: float = CONVERGE_S) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within_s, f"not within {within_s} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def add(server: Server, item_id: str, name: str, **headers: str) -> Any:
    return server.request("POST", f"/v1/items?id={item_id}", photo(name), {**JPEG, **headers})


def status_of(server: Server, item_id: str) -> int:
    return server.request("GET", f"/v1/items/{item_id}").status


def index_size(server: Server) -> int:
    return int(server.request("GET", "/v1/index").json()["size"])


def applied_seq(server: Server) -> int:
    return int(server.request("GET", "/v1/index").json()["catalog"]["applied_seq"])


def follows(other: Server, one: Server) -> Callable[[], bool]:
    """Whether ``other``'s index has applied every change ``one``'s has. A read by id is no
    sign of it: while the catalog is up, it answers reads, whatever the index holds."""
    target = applied_seq(one)
    return lambda: applied_seq(other) >= target


def test_both_replicas_start_together_and_share_the_demo(replicas: list[Server]) -> None:
    eventually(lambda: [index_size(r) for r in replicas] == [8, 8], "8 demo items on each")


def test_an_add_and_a_delete_through_one_are_seen_through_the_other(
    replicas: list[Server],
) -> None:
    one, other = replicas
    assert add(one, "shared-cat", "cat").status == 200
    seen_s = eventually(follows(other, one), "the add in the other's index")
    found = other.request("POST", "/v1/search?k=1", photo("cat"), JPEG).json()
    assert found["results"][0]["matches"][0]["id"] in {"shared-cat", "sample/cat"}
    assert one.request("DELETE", "/v1/items/shared-cat").status == 200
    eventually(lambda: status_of(other, "shared-cat") == 404, "the delete on the other")
    assert seen_s < CONVERGE_S


def test_local_features_made_on_one_replica_verify_on_the_other(replicas: list[Server]) -> None:
    """An add's local features go to the shared catalog with it: a verified search through
    the other replica proves a crop of it a copy."""
    one, other = replicas
    image = Image.open(io.BytesIO(photo("rocket")))
    width, height = image.size
    crop = io.BytesIO()
    image.crop((width // 6, height // 6, width, height)).save(crop, "JPEG", quality=85)
    assert add(one, "shared-rocket", "rocket").status == 200
    eventually(follows(other, one), "the add in the other's index")
    found = other.request("POST", "/v1/search?k=3&verify=true", crop.getvalue(), JPEG).json()
    verified = {m["id"] for m in found["results"][0]["matches"] if m["verified"]}
    assert verified == {"shared-rocket", "sample/rocket"}, found
    assert one.request("DELETE", "/v1/items/shared-rocket").status == 200


def test_concurrent_adds_of_distinct_and_clashing_ids_converge(replicas: list[Server]) -> None:
    names = ("cat", "coffee", "rocket", "brick")
    jobs = [(r, f"mine-{i}-{n}", n) for i, r in enumerate(replicas) for n in names]
    jobs += [(r, f"clash-{n}", n) for r in replicas for n in names]  # the same ids on both
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda job: add(*job).status, jobs))
    assert answers == [200] * len(jobs)
    expected = 8 + 2 * len(names) + len(names)
    eventually(lambda: [index_size(r) for r in replicas] == [expected] * 2, "the same size")
    for server in replicas:
        for name in names:
            matches = server.request("POST", "/v1/search?k=20", photo(name), JPEG).json()
            ids = [m["id"] for m in matches["results"][0]["matches"]]
            assert ids.count(f"clash-{name}") == 1, (server.port, ids)  # one vector per id


def test_with_postgresql_down_searches_go_on_and_writes_get_a_prompt_503(
    replicas: list[Server], postgres: PostgresCluster
) -> None:
    one, other = replicas
    postgres.stop()
    try:
        assert one.request("POST", "/v1/search?k=3", photo("coffee"), JPEG).status == 200
        # Answered while PostgreSQL is still down: refused, not held until it comes back.
        refused = add(one, "during-outage", "rocket")
        assert refused.status == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "catalog_unavailable"
    finally:
        postgres.start()
    eventually(lambda: add(one, "after-outage", "rocket").status == 200, "writes again")
    eventually(lambda: status_of(other, "after-outage") == 200, "the other catches up")


def test_with_postgresql_down_items_are_read_from_memory_and_deletes_get_a_503(
    replicas: list[Server], postgres: PostgresCluster
) -> None:
    one, other = replicas
    assert add(one, "kept-in-memory", "brick").status == 200
    eventually(follows(other, one), "the add in the other's index (its memory)")
    before = [r.request("GET", "/v1/items/kept-in-memory").json() for r in replicas]
    postgres.stop()
    try:
        for server, known in zip(replicas, before, strict=True):
            found = server.request("GET", "/v1/items/kept-in-memory")
            assert found.status == 200 and found.json() == known
            # Not in memory: perhaps added through a replica that still reaches PostgreSQL.
            assert status_of(server, "never-added") == 503
        # Answered while PostgreSQL is still down: refused, not held until it comes back.
        refused = other.request("DELETE", "/v1/items/kept-in-memory")
        assert refused.status == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "catalog_unavailable"
        assert status_of(other, "kept-in-memory") == 200  # not deleted
    finally:
        postgres.start()
    eventually(lambda: add(one, "after-reads", "rocket").status == 200, "writes again")
    eventually(lambda: status_of(other, "after-reads") == 200, "the other follows again")
    assert status_of(one, "kept-in-memory") == 200


def test_a_restarted_replica_replays_what_it_missed_from_its_snapshot(
    replicas: list[Server], catalog: str
) -> None:
    one, other = replicas
    directory = other.log_path.parent
    stop_server(other)  # writes its final snapshot
    assert add(one, "while-away", "brick").status == 200
    back = replica(directory, catalog)
    replicas[1] = back
    assert status_of(back, "while-away") == 200  # ready means caught up
    assert "changes replayed" in back.log()
    assert index_size(back) == index_size(one)
