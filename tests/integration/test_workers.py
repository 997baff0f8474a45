"""``--workers 2``: two edge processes in front of one model core, as real processes on
127.0.0.1: every route through either edge, one batch of both edges' images, the queue's
bound, deadlines and hang-ups across processes, SIGTERM, and an edge or the core killed."""

from __future__ import annotations

import base64
import http.client
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from batchserve.testing import encode_image, encode_multipart
from tests.integration.conftest import (
    Server,
    http_request,
    metric,
    start_server,
    stop_server,
    wait_until,
)
from tests.integration.gated_model import build_gated_model

PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("workers"), "--workers", "2", "--no-demo")
    try:
        wait_until(lambda: len(edge_pids(running)) == 2, "both edges to say they serve")
        yield running
    finally:
        assert stop_server(running) == 0


def edge_pids(server: Server) -> dict[int, int]:
    """Each edge's latest process id, from its "serving" line."""
    found = re.findall(r"edge (\d+) serving \(pid (\d+)\)", server.log())
    return {int(edge): int(pid) for edge, pid in found}


def answered_by(server: Server, route: str) -> set[str]:
    """The processes whose access lines answered ``route``."""
    return set(
        re.findall(r"\[(edge-\d+)\] batchserve\.access: \S+ " + re.escape(route), server.log())
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_route_answers_through_the_edges(edges: Server, photos: list[bytes]) -> None:
    body, content_type = encode_multipart(
        [("image", "cat.jpg", photos[0])], {"id": "cat", "label": "pet"}
    )
    added = edges.request("POST", "/v1/items", body, {"Content-Type": content_type})
    assert added.status == 200 and added.json()["added"] == ["cat"]
    found = edges.request("POST", "/v1/search?k=1", photos[1], {"Content-Type": "image/jpeg"})
    assert found.json()["results"][0]["matches"][0]["id"] == "cat"
    assert edges.request("GET", "/v1/items/cat").json()["label"] == "pet"
    embedded = edges.request("POST", "/v1/embed", photos[0], {"Content-Type": "image/jpeg"})
    assert len(embedded.json()["results"][0]["embedding"]) == 1280
    model = edges.request("GET", "/v1/model").json()["name"]
    inputs = [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
               "data": [base64.b64encode(photos[0]).decode()]}]  # fmt: skip
    inferred = edges.request(
        "POST", f"/v2/models/{model}/infer", json_body({"inputs": inputs}), JSON
    )
    assert inferred.status == 200
    assert inferred.json()["outputs"][0]["name"] == "EMBEDDING"
    page = edges.request("GET", "/")
    assert page.status == 200 and b"<html" in page.body.lower()
    assert edges.request("GET", "/readyz").json() == {"status": "ready"}
    assert edges.request("DELETE", "/v1/items/cat").status == 200
    assert edges.request("GET", "/v1/items/cat").status == 404
    assert "[core] batchserve: batchserve" in edges.log()  # each line names its process


JSON = {"Content-Type": "application/json"}


def json_body(document: object) -> bytes:
    import json

    return json.dumps(document).encode()


def test_both_edges_take_requests_their_images_share_batches_and_metrics_count_all(
    edges: Server, photos: list[bytes]
) -> None:
    before = metric(edges, "batchserve_requests_total", code="200", route="/v1/embed")
    mixed_before = mixed_batches(edges)

    def embed(i: int) -> int:
        photo = photos[i % len(photos)]
        return edges.request("POST", "/v1/embed", photo, {"Content-Type": "image/jpeg"}).status

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(embed, range(160)))
    assert statuses == [200] * 160
    assert answered_by(edges, "/v1/embed") == {"edge-0", "edge-1"}
    after = metric(edges, "batchserve_requests_total", code="200", route="/v1/embed")
    assert after - before == 160  # every edge's requests, counted in one registry
    assert mixed_batches(edges) > mixed_before  # batches held images from both edges


def mixed_batches(server: Server) -> float:
    """Batches that held images from more than one edge, so far."""
    count = metric(server, "batchserve_batch_edges_count")
    return count - metric(server, "batchserve_batch_edges_bucket", le="1.0")


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Server, object]]:
    model = build_gated_model(tmp_path / "model")
    server = start_server(
        tmp_path / "server", "--workers", "2", "--model", str(model.path), "--no-demo",
        "--max-batch-size", "1", "--max-queue", "4", "--no-full-batch-ahead",
        "--drain-timeout-s", "60",
    )  # fmt: skip
    try:
        yield server, model
    finally:
        model.open()
        stop_server(server)


def test_the_queue_bound_deadlines_and_hang_ups_hold_across_processes(
    gated: tuple[Server, object],
) -> None:
    server, model = gated
    warm = len(model.calls())  # type: ignore[attr-defined]  # the warm-up's
    model.close()  # type: ignore[attr-defined]
    with ThreadPoolExecutor(8) as pool:
        held = pool.submit(server.request, "POST", "/v1/embed", encode_image(fmt="PNG"), PNG)
        model.wait_for_calls(warm + 1)  # type: ignore[attr-defined]
        # A deadline that passes in the core's queue: 504, and the model never runs it.
        late = server.request(
            "POST", "/v1/embed", encode_image(fmt="PNG"), {**PNG, "X-Timeout-Ms": "1000"}
        )
        assert late.status == 504
        # A client that hangs up: the core drops its image.
        hang_up(server.port, encode_image(fmt="PNG"))
        wait_until(
            lambda: (
                metric(server, "batchserve_rejected_total", reason="cancelled") >= 1
                and metric(server, "batchserve_queue_items") == 0
            ),
            "the core to drop the image of the client that hung up",
        )
        # The core's queue bound, 4 images: a fifth request is refused at an edge.
        queued = [
            pool.submit(server.request, "POST", "/v1/embed", encode_image(fmt="PNG"), PNG)
            for _ in range(4)
        ]
        wait_until(lambda: metric(server, "batchserve_queue_items") == 4, "the queue to fill")
        wait_until(lambda: refused(server), "an edge to refuse with 503", timeout_s=20)
        model.open()  # type: ignore[attr-defined]
        assert held.result().status == 200
        assert [f.result().status for f in queued] == [200] * 4, [f.result().body for f in queued]
    assert metric(server, "batchserve_rejected_total", reason="deadline") >= 1
    # The one held and the four queued ran; neither the late one nor the hung-up one did.
    assert len(model.calls()) - warm == 5  # type: ignore[attr-defined]


def refused(server: Server) -> bool:
    response = server.request("POST", "/v1/embed", encode_image(fmt="PNG"), PNG)
    if response.status == 200:
        return False
    assert response.status == 503 and int(response.headers["retry-after"]) >= 1
    assert "queue full" in response.json()["error"]["message"]
    return True


def hang_up(port: int, image: bytes) -> None:
    """Send a whole request, then close the connection before the answer."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        head = (
            f"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(image)}\r\n\r\n"
        )
        conn.sendall(head.encode() + image)
        time.sleep(0.3)


def test_sigterm_drains_the_requests_in_flight_on_both_edges_then_exits_0(
    gated: tuple[Server, object],
) -> None:
    server, model = gated
    model.close()  # type: ignore[attr-defined]
    with ThreadPoolExecutor(5) as pool:
        futures = [
            pool.submit(server.request, "POST", "/v1/embed", encode_image(fmt="PNG"), PNG, 120.0)
            for _ in range(5)
        ]
        # One with the model, four in the core's queue.
        wait_until(lambda: metric(server, "batchserve_queue_items") == 4, "five requests in")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: server.log().count("draining") == 2, "both edges to drain")
        model.open()  # type: ignore[attr-defined]
        assert [f.result().status for f in futures] == [200] * 5
    assert server.process.wait(timeout=60) == 0
    assert answered_by(server, "/v1/embed") == {"edge-0", "edge-1"}
    assert not any(alive(pid) for pid in edge_pids(server).values())


def test_an_edge_killed_under_load_fails_only_its_own_requests_and_comes_back(
    tmp_path: Path, photos: list[bytes]
) -> None:
    server = start_server(tmp_path, "--workers", "2", "--no-demo")
    results: list[int | str] = []
    stop = threading.Event()
    try:
        wait_until(lambda: len(edge_pids(server)) == 2, "both edges to serve")
        first = edge_pids(server)

        def client() -> None:
            while not stop.is_set():
                try:
                    photo = photos[len(results) % len(photos)]
                    response = http_request(
                        server.port, "POST", "/v1/embed", photo, {"Content-Type": "image/jpeg"}
                    )
                    results.append(response.status)
                except (OSError, http.client.HTTPException) as e:
                    results.append(type(e).__name__)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 30, "load on both edges")
        os.kill(first[0], signal.SIGKILL)
        wait_until(lambda: edge_pids(server).get(0, first[0]) != first[0], "edge 0 to restart")
        settled = len(results)
        wait_until(lambda: len(results) >= settled + 30, "load after the restart")
        stop.set()
        for t in threads:
            t.join()
        failed = [r for r in results if r != 200]
        # Only the requests the dead edge held failed, each with its connection: no
        # error status from the other edge or the core.
        assert len(failed) <= 6 and all(isinstance(r, str) for r in failed), failed
        assert all(r == 200 for r in results[settled:])
        assert alive(first[1]) and edge_pids(server)[1] == first[1]  # the other edge lived on
        assert "edge 0 was killed by signal 9 after" in server.log()
        restarted = edge_pids(server)[0]
        assert re.search(
            r"\[edge-0\] batchserve\.access: POST /v1/embed 200", later_log(server, restarted)
        )
    finally:
        stop.set()  # the clients stop whatever failed
        assert stop_server(server) == 0


def later_log(server: Server, pid: int) -> str:
    """The log from the line that says process ``pid`` serves."""
    log = server.log()
    return log[log.index(f"(pid {pid})") :]


def test_a_core_killed_takes_its_edges_down_and_loses_nothing_acknowledged(
    tmp_path: Path, photos: list[bytes]
) -> None:
    server = start_server(tmp_path, "--workers", "2", "--no-demo")
    acked: list[str] = []
    unexpected: list[int] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            item = f"w{n}-{i}"
            i += 1
            body, ctype = encode_multipart(
                [("image", "w.jpg", photos[i % len(photos)])], {"id": item}
            )
            try:
                response = http_request(
                    server.port, "POST", "/v1/items", body, {"Content-Type": ctype}
                )
            except (OSError, http.client.HTTPException):
                continue  # the core died with it in flight: not acknowledged
            if response.status == 200:
                acked.append(item)
            elif response.status != 503:
                unexpected.append(response.status)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    try:
        wait_until(lambda: len(edge_pids(server)) == 2, "both edges to serve")
        pids = edge_pids(server)
        for t in threads:
            t.start()
        wait_until(lambda: len(acked) >= 20, "writes acknowledged")
        server.process.kill()
        wait_until(lambda: not any(alive(p) for p in pids.values()), "the edges to exit", 20)
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
        if server.process.poll() is None:
            server.process.kill()
    assert unexpected == []  # each write was acknowledged, refused with 503, or cut off
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert "the model core went away" in server.log()
    again = start_server(tmp_path, "--workers", "2", "--no-demo")
    try:
        missing = [i for i in acked if again.request("GET", f"/v1/items/{i}").status != 200]
        assert missing == []
    finally:
        assert stop_server(again) == 0
