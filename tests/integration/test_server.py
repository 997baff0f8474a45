"""The real server, started as users start it, with the real built-in model."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from batchserve.testing import encode_image, encode_multipart
from tests.integration.conftest import Server, metric, start_server, stop_server, wait_until
from tests.integration.gated_model import build_gated_model


def embed(server: Server, image: bytes) -> np.ndarray:
    response = server.request("POST", "/v1/embed", image, {"Content-Type": "image/jpeg"})
    assert response.status == 200, response.body
    return np.array(response.json()["results"][0]["embedding"], dtype=np.float32)


def histogram_count(metrics: str, name: str, le: str) -> float:
    found = re.search(rf'^{name}_bucket{{le="{re.escape(le)}"}} (\S+)$', metrics, re.M)
    assert found, f"{name} bucket {le} missing"
    return float(found.group(1))


def test_model_endpoint_describes_the_builtin_model(server: Server) -> None:
    doc = server.request("GET", "/v1/model").json()
    assert doc["dim"] == 1280 and doc["input_size"] == [160, 160]
    assert len(doc["classes"]) == 19 and doc["pretrained"] is True
    assert doc["weights_sha256"].startswith("272e38e5be14")


def test_32_concurrent_requests_all_succeed_are_batched_and_match_single_requests(
    server: Server, photos: list[bytes]
) -> None:
    alone = [embed(server, photo) for photo in photos]
    before = server.request("GET", "/metrics").body.decode()
    work = [i % len(photos) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda i: embed(server, photos[i]), work))
    after = server.request("GET", "/metrics").body.decode()

    for i, vector in zip(work, together, strict=True):
        assert vector.shape == (1280,)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4
        np.testing.assert_allclose(vector, alone[i], atol=1e-4)
    batches = histogram_count(after, "batchserve_batch_size", "+Inf") - histogram_count(
        before, "batchserve_batch_size", "+Inf"
    )
    singles = histogram_count(after, "batchserve_batch_size", "1.0") - histogram_count(
        before, "batchserve_batch_size", "1.0"
    )
    assert batches < 32, "every image ran alone: no batching happened"
    assert batches - singles >= 1, "no batch larger than 1"


def test_different_photos_get_different_embeddings_and_crops_stay_close(
    server: Server, photos: list[bytes]
) -> None:
    vectors = [embed(server, p) for p in photos]
    cat, cat_crop, astronaut = vectors[0], vectors[1], vectors[2]
    assert float(cat @ cat_crop) > float(cat @ astronaut)


def test_multipart_and_base64_give_the_same_embeddings_as_raw(
    server: Server, photos: list[bytes]
) -> None:
    raw = [embed(server, p) for p in photos[:3]]
    body, ctype = encode_multipart([("image", f"{i}.jpg", p) for i, p in enumerate(photos[:3])])
    multipart = server.request("POST", "/v1/embed", body, {"Content-Type": ctype}).json()
    b64 = {"images": [{"b64": base64.b64encode(p).decode()} for p in photos[:3]]}
    as_json = server.request(
        "POST", "/v1/embed", json.dumps(b64).encode(), {"Content-Type": "application/json"}
    ).json()
    for doc in (multipart, as_json):
        got = np.array([r["embedding"] for r in doc["results"]], dtype=np.float32)
        np.testing.assert_allclose(got, np.stack(raw), atol=1e-4)


def test_classify_ranks_every_breed_by_a_softmax_best_first(
    server: Server, photos: list[bytes]
) -> None:
    classes = server.request("GET", "/v1/model").json()["classes"]
    jpeg = {"Content-Type": "image/jpeg"}
    everything = server.request("POST", f"/v1/classify?k={len(classes)}", photos[0], jpeg)
    assert everything.status == 200
    ranked = everything.json()["results"][0]["labels"]
    scores = [x["score"] for x in ranked]
    assert sorted(x["label"] for x in ranked) == sorted(classes)  # each breed once
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-3)
    top3 = server.request("POST", "/v1/classify?k=3", photos[0], jpeg).json()
    assert top3["results"][0]["labels"] == ranked[:3]


def test_bad_input_is_4xx_and_the_server_goes_on(server: Server, photos: list[bytes]) -> None:
    cases = [
        (b"", "image/jpeg", 400),
        (photos[0][: len(photos[0]) // 3], "image/jpeg", 400),
        (b"<html></html>", "text/html", 415),
        (b"{", "application/json", 400),
    ]
    for body, ctype, status in cases:
        response = server.request("POST", "/v1/embed", body, {"Content-Type": ctype})
        assert response.status == status, (ctype, response.body)
        assert response.json()["error"]["message"]
    assert server.request("GET", "/healthz").status == 200
    embed(server, photos[0])


def test_metrics_expose_the_design_names(server: Server, photos: list[bytes]) -> None:
    embed(server, photos[0])
    text = server.request("GET", "/metrics").body.decode()
    for name in (
        "batchserve_requests_total",
        "batchserve_request_seconds_bucket",
        "batchserve_queue_items",
        "batchserve_queue_wait_seconds_bucket",
        "batchserve_batch_size_bucket",
        "batchserve_inference_seconds_bucket",
        "batchserve_decode_seconds_bucket",
        "batchserve_model_info",
    ):
        assert name in text, name


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-batch-size", "4")
    assert server.request("GET", "/readyz").status == 200
    assert stop_server(server) == 0
    assert "shutting down" in server.log()


def test_sigterm_answers_every_request_already_taken_then_exits_0(tmp_path: Path) -> None:
    import signal

    model = build_gated_model(tmp_path / "model")
    server = start_server(
        tmp_path / "server",
        "--model",
        str(model.path),
        "--no-demo",
        "--max-batch-size",
        "1",
        "--drain-timeout-s",
        "60",
        "--workers",
        "0",  # one process; edges' drain: test_workers.py
    )
    png = {"Content-Type": "image/png"}
    try:
        model.close()
        with ThreadPoolExecutor(12) as pool:
            futures = [
                pool.submit(
                    server.request, "POST", "/v1/embed", encode_image(fmt="PNG"), png, 120.0
                )
                for _ in range(12)
            ]
            # Every request is in the server: one held by the model, one handed to it ahead
            # (--full-batch-ahead), ten queued.
            wait_until(lambda: metric(server, "batchserve_queue_items") == 10, "12 requests in")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: "shutting down" in server.log(), "the drain to start")
            model.open()
            statuses = [f.result().status for f in futures]
        assert statuses == [200] * 12
        assert server.process.wait(timeout=60) == 0
    finally:
        model.open()
        stop_server(server)
    log = server.log()
    assert "shutting down: 12 requests in flight, waiting up to 60 s" in log
    assert "stopped" in log
    assert model.calls()[-12:] == [1] * 12


def test_tokens_and_the_metrics_address_from_the_settings(
    tmp_path: Path, photos: list[bytes]
) -> None:
    import http.client

    server = start_server(
        tmp_path,
        "--api-token",
        "read-secret",
        "--write-token",
        "write-secret",
        "--metrics-address",
        "127.0.0.1:0",
        "--no-demo",
    )
    try:
        jpeg = {"Content-Type": "image/jpeg"}
        assert server.request("POST", "/v1/embed", photos[0], jpeg).status == 401
        wrong = {**jpeg, "Authorization": "Bearer nope"}
        assert server.request("POST", "/v1/embed", photos[0], wrong).status == 403
        reader = {**jpeg, "Authorization": "Bearer read-secret"}
        assert server.request("POST", "/v1/embed", photos[0], reader).status == 200
        assert server.request("DELETE", "/v1/items/x", None, reader).status == 403
        assert server.request("GET", "/metrics").status == 404
        [port] = re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log())
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and b"batchserve_requests_total" in response.read()
        conn.close()
    finally:
        stop_server(server)


def test_clients_that_hang_up_have_their_queued_images_dropped(tmp_path: Path) -> None:
    import socket

    model = build_gated_model(tmp_path / "model")
    server = start_server(
        tmp_path / "server", "--model", str(model.path), "--no-demo", "--max-batch-size", "1"
    )
    try:
        model.close()
        started = len(model.calls())
        body = encode_image(fmt="PNG")
        head = (
            f"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sockets = []
        for _ in range(24):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(head + body)
            sockets.append(s)
        # Every image is in the server: one held by the model, one handed to it ahead
        # (--full-batch-ahead), 22 queued.
        wait_until(lambda: metric(server, "batchserve_queue_items") == 22, "24 images in")
        for s in sockets:
            s.close()
        wait_until(lambda: metric(server, "batchserve_queue_items") == 0, "the queue dropped")
        wait_until(
            lambda: metric(server, "batchserve_rejected_total", reason="cancelled") == 24,
            "24 cancellations",
        )
        model.open()
        png = {"Content-Type": "image/png"}
        assert server.request("POST", "/v1/embed", body, png).status == 200  # it goes on
        # The model ran the image it held when the clients left, then the new one: none of
        # the 23 others of clients that were gone, the one handed over ahead included.
        assert model.calls()[started:] == [1, 1]
    finally:
        model.open()
        stop_server(server)


def bench_run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench run ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bench", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_load_generator_smoke_run_against_the_real_server(server: Server, tmp_path: Path) -> None:
    """The bench/ load generator end to end, for a few seconds (no timing assertions)."""
    url = f"http://127.0.0.1:{server.port}"
    out, plot = tmp_path / "points.json", tmp_path / "sweep.png"
    done = bench_run(
        "--url",
        url,
        "--mode",
        "open",
        "--rates",
        "15",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert done.returncode == 0, done.stderr
    [point] = json.loads(out.read_text())
    assert point["mode"] == "open" and point["requests"] > 0 and point["errors"] == {}
    assert point["server"]["batch_sizes"] and plot.stat().st_size > 0
    assert point["server"]["mean_decode_ms"] > 0 and point["server"]["mean_request_ms"] > 0
    done = bench_run(
        "--url",
        url,
        "--mode",
        "closed",
        "--concurrency",
        "4",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--processes",
        "2",
        "--encoding",
        "multipart",
        "--images-per-request",
        "2",
    )
    assert done.returncode == 0, done.stderr
    closed = json.loads(done.stdout.splitlines()[-1])
    assert closed["concurrency"] == 4 and closed["errors"] == {} and closed["requests"] > 0
