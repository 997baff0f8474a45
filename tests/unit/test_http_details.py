"""HTTP details people trip over: 405 with Allow, ids that hold '/', unknown query
parameters, a request's own deadline, RFC 3339 times, where a request's time went, the
item list, thumbnails with ETags, and the pages a browser opens."""

from __future__ import annotations

import gc
import io
import json
import tracemalloc
from typing import Any

import numpy as np
import pytest
from PIL import Image

from batchserve import __version__
from batchserve.http import web
from batchserve.storage.records import NewItem
from batchserve.testing import FakeRunner, SiteClient, encode_image, result_of
from tests.unit.test_api import BLUE, RED, Harness, _prediction, add


def photo(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    return encode_image(fmt="JPEG", colour=colour, size=(width, height))


def test_a_wrong_method_is_405_naming_the_allowed_ones() -> None:
    h = Harness()
    status, headers, doc = h.request("PUT", "/v1/embed")
    assert status == 405 and headers["allow"] == "POST"
    assert doc["error"]["code"] == "method_not_allowed" and "allowed: POST" in str(doc)
    status, headers, _ = h.request("POST", "/v1/items/x")
    assert status == 405 and set(headers["allow"].split(", ")) >= {"DELETE", "GET"}


def test_an_id_with_a_slash_is_one_path_segment_and_never_a_sub_route() -> None:
    h = Harness()
    assert add(h, "x/similar", RED)[0] == 200
    assert add(h, "x", BLUE)[0] == 200
    status, _, item = h.request("GET", "/v1/items/x%2Fsimilar")
    assert status == 200 and item["id"] == "x/similar"
    status, _, doc = h.request("GET", "/v1/items/x%2Fsimilar/similar?k=5")
    assert status == 200 and [m["id"] for m in doc["results"][0]["matches"]] == ["x"]
    status, _, doc = h.request("GET", "/v1/items/x/similar?k=5")  # item x's neighbours
    assert status == 200 and [m["id"] for m in doc["results"][0]["matches"]] == ["x/similar"]
    assert h.request("GET", "/v1/items/x%2fsimilar/thumbnail")[0] == 200
    assert h.request("DELETE", "/v1/items/x%2Fsimilar")[2]["deleted"] == "x/similar"
    assert h.request("GET", "/v1/items/x")[0] == 200


def test_equivalent_spellings_of_a_path_route_alike() -> None:
    h = Harness()
    assert h.post_image("/v1/%65mbed", RED)[0] == 200
    assert add(h, "a b", RED)[0] == 200
    assert h.request("GET", "/v1/items/a%20b")[2]["id"] == "a b"


def test_unknown_query_parameters_are_400_naming_the_known_ones() -> None:
    h = Harness()
    status, _, doc = h.post_image("/v1/search?kk=3", RED)
    assert status == 400 and doc["error"]["code"] == "invalid_input"
    message = doc["error"]["message"]
    assert "kk" in message and "k, label, min_score, same_class, timeout_ms" in message
    add(h, "red", RED)
    status, _, doc = h.request("GET", "/v1/items/red?verbose=1")
    assert status == 400 and "takes: none" in doc["error"]["message"]
    assert h.request("GET", "/healthz?probe=1")[0] == 200  # outside /v1: ignored


@pytest.mark.parametrize("how", ["query", "header"])
def test_a_request_sets_its_own_deadline_below_the_servers(how: str) -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, timeout_s=10.0)
    path, headers = "/v1/embed", {"Content-Type": "image/jpeg"}
    if how == "query":
        path += "?timeout_ms=1500"
    else:
        headers["X-Timeout-Ms"] = "1500"
    d = h.send("POST", path, RED, headers)
    h.flush()
    h.clock.advance(1.4)
    h.flush()
    assert not d.called
    h.clock.advance(0.2)
    h.flush()
    assert result_of(d).code == 504


def test_the_servers_deadline_caps_a_longer_one() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, timeout_s=2.0)
    d = h.post("/v1/embed?timeout_ms=60000", RED)
    h.flush()
    h.clock.advance(2.1)
    h.flush()
    assert result_of(d).code == 504


def test_both_deadlines_given_must_each_be_valid_and_the_shorter_wins() -> None:
    h = Harness()
    headers = {"Content-Type": "image/jpeg", "X-Timeout-Ms": "3600001"}
    assert h.request("POST", "/v1/embed?timeout_ms=1000", RED, headers)[0] == 400
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, timeout_s=10.0)
    headers["X-Timeout-Ms"] = "1200"
    d = h.send("POST", "/v1/embed?timeout_ms=5000", RED, headers)
    h.flush()
    h.clock.advance(1.3)
    h.flush()
    assert result_of(d).code == 504


@pytest.mark.parametrize("value", ["999", "0", "-5", "soon", "3600001"])
def test_a_deadline_out_of_bounds_is_400(value: str) -> None:
    status, _, doc = Harness().post_image(f"/v1/embed?timeout_ms={value}", RED)
    assert status == 400 and "timeout_ms" in doc["error"]["message"]


def test_responses_through_the_model_say_where_the_time_went() -> None:
    h = Harness()
    add(h, "red", RED)
    for path in ("/v1/embed", "/v1/classify", "/v1/search"):
        status, headers, doc = h.post_image(path, RED)
        assert status == 200, path
        timings = doc["timings_ms"]
        assert set(timings) == {"decode", "queue", "model", "search", "verify"}
        assert all(v >= 0 for v in timings.values()) and timings["decode"] > 0
        served = dict(part.split(";dur=") for part in headers["server-timing"].split(", "))
        assert {k: float(v) for k, v in served.items()} == timings
    status, _, doc = h.post_image("/v1/search", RED)
    assert doc["timings_ms"]["search"] > 0  # the index stage was timed


def test_a_request_that_waits_for_a_batch_reports_its_queue_time() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    first = h.post("/v1/embed", RED)
    second = h.post("/v1/embed", BLUE)  # queued behind the first batch
    h.flush()
    runner.complete(lambda _img: _prediction())
    runner.complete(lambda _img: _prediction())
    h.flush()
    for d in (first, second):
        timings = result_of(d).json()["timings_ms"]
        assert timings["queue"] >= 0 and timings["model"] >= 0


def test_items_are_listed_newest_first_a_page_at_a_time() -> None:
    h = Harness()
    for name in ("a", "b", "c"):
        add(h, name, RED, label="reds")
    status, _, page = h.request("GET", "/v1/items?limit=2")
    assert status == 200 and [i["id"] for i in page["items"]] == ["c", "b"]
    assert page["items"][0]["label"] == "reds" and page["items"][0]["created"].endswith("Z")
    _, _, rest = h.request("GET", f"/v1/items?limit=2&cursor={page['next']}")
    assert [i["id"] for i in rest["items"]] == ["a"] and rest["next"] is None
    assert h.request("GET", "/v1/items")[2]["next"] is None
    for bad in ("limit=0", "limit=1001", "cursor=x", "cursor=0"):
        assert h.request("GET", f"/v1/items?{bad}")[0] == 400, bad


def test_an_added_item_has_a_thumbnail_upright_with_its_aspect() -> None:
    h = Harness()
    assert add(h, "wide", photo(600, 300))[0] == 200
    status, headers, body = h.request("GET", "/v1/items/wide/thumbnail")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(body)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (256, 128)
    assert headers["cache-control"] == "private, no-cache"
    etag = headers["etag"]
    status, headers, body = h.request(
        "GET", "/v1/items/wide/thumbnail", headers={"If-None-Match": f'"other", {etag}'}
    )
    assert status == 304 and body == b"" and headers["etag"] == etag
    add(h, "wide", photo(300, 600))  # the same id, another image: another tag
    status, headers, body = h.request(
        "GET", "/v1/items/wide/thumbnail", headers={"If-None-Match": etag}
    )
    assert status == 200 and headers["etag"] != etag
    with Image.open(io.BytesIO(body)) as thumb:
        assert thumb.size == (128, 256)


def test_an_added_item_stores_its_local_features_found_in_the_frame() -> None:
    from batchserve.models.keypoints import FRAME, LocalFeatures

    h = Harness()
    picture = Image.effect_noise((600, 300), 60).convert("RGB")  # texture: keypoints
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=90)
    assert add(h, "noisy", out.getvalue())[0] == 200
    catalog = h.server.store._store.catalog
    fid = catalog.thumbnail("noisy")[0]
    features = LocalFeatures.from_bytes(catalog.local_features([fid])[fid])
    assert features.size == (FRAME, FRAME // 2) and len(features) > 50


def test_an_item_without_a_thumbnail_or_no_item_is_404() -> None:
    h = Harness()
    embedding = _prediction().embedding
    h.index.call(lambda store: store.add([NewItem("old", embedding)]))
    status, _, doc = h.request("GET", "/v1/items/old/thumbnail")
    assert status == 404 and "no thumbnail" in doc["error"]["message"]
    status, _, doc = h.request("GET", "/v1/items/nothing/thumbnail")
    assert status == 404 and "no item" in doc["error"]["message"]
    assert h.request("GET", "/v1/items/old")[0] == 200


def test_the_model_says_what_it_was_trained_on() -> None:
    status, _, doc = Harness().request("GET", "/v1/model")
    assert status == 200 and doc["trained_on"]


def test_the_search_page_and_its_files_are_served_from_the_package() -> None:
    h = Harness()
    status, headers, page = h.request("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"/web/app.js" in page and b"/web/app.css" in page
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        status, headers, _ = h.request("GET", f"/web/{name}")
        assert status == 200 and headers["content-type"].startswith(kind), name
        again = h.request("GET", f"/web/{name}", headers={"If-None-Match": headers["etag"]})
        assert again[0] == 304
    for missing in ("/web/nope.js", "/web/..%2Fapi.py", "/web/index.txt"):
        assert h.request("GET", missing)[0] == 404, missing


def test_the_docs_page_is_rendered_from_the_document() -> None:
    h = Harness()
    status, headers, page = h.request("GET", "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    document = h.request("GET", "/openapi.json")[2]
    for path in document["paths"]:
        assert path.encode() in page, path


def test_unknown_web_names_are_404_and_keep_nothing() -> None:
    h = Harness()

    def unknown(i: int) -> str:
        return f"{i:04d}-" + "x" * 4000 + ".js"

    assert all(h.request("GET", f"/web/{unknown(i)}")[0] == 404 for i in range(5))
    # What the /web/ route looks up (the Harness's Site keeps its access lines and timers),
    # each name made afresh as a request's would be.
    web.asset("warm-up")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert all(web.asset(unknown(i)) is None for i in range(500))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000, f"{kept} bytes kept after 500 unknown names of 4 kB"
    assert set(web.shipped()) == {*web.FILES, "index.html"}  # the fixed set, nothing added
    for name in web.FILES:
        status, headers, body = h.request("GET", f"/web/{name}")
        assert status == 200 and headers["etag"] == web.shipped()[name].etag, name
        assert body == web.shipped()[name].body and headers["cache-control"] == "no-cache"
        assert (
            h.request("GET", f"/web/{name}", headers={"If-None-Match": headers["etag"]})[0] == 304
        )


def nested(levels: int) -> dict[str, Any]:
    """Metadata of ``levels`` objects, each inside the one before."""
    doc: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        doc = {"in": doc}
    return doc


def test_a_response_that_cannot_be_written_as_json_is_a_json_500_of_its_own() -> None:
    h = Harness()
    assert add(h, "plain", RED)[0] == 200
    # Stored before metadata depth was checked: deeper than orjson writes (254).
    embedding = h.model.predict(np.zeros((1, 32, 32, 3), np.float32)).embeddings[0]
    h.index.call(lambda store: store.add([NewItem("deep", embedding, metadata=nested(300))]))
    for path in ("/v1/items/deep", "/v1/items?limit=10"):
        status, headers, doc = h.request("GET", path)
        assert status == 500 and headers["content-type"] == "application/json", path
        assert doc["error"]["code"] == "internal" and "JSON" in doc["error"]["message"]
        assert headers["cache-control"] == "no-store"
    status, _, item = h.request("GET", "/v1/items/plain")  # other items still answer
    assert status == 200 and item["id"] == "plain"
    assert h.request("GET", "/healthz")[0] == 200


def test_api_json_is_never_sniffed_or_stored_while_pages_keep_their_caching() -> None:
    h = Harness()
    add(h, "red", RED)
    for method, path in (
        ("GET", "/healthz"),
        ("GET", "/v1/index"),
        ("GET", "/v1/items/red"),
        ("GET", "/v1/items/nothing"),
        ("GET", "/v1/nothing-here"),
        ("GET", "/web/nope.js"),
        ("GET", "/openapi.json"),
        ("GET", "/v2/health/live"),
        ("PUT", "/v1/embed"),
    ):
        _, headers, _ = h.request(method, path)
        assert headers["content-type"] == "application/json", path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["cache-control"] == "no-store", path
    _, headers, _ = h.post_image("/v1/embed", RED)
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    for path in ("/", "/web/app.js", "/docs"):
        assert h.request("GET", path)[1]["cache-control"] == "no-cache", path
    thumbnail = h.request("GET", "/v1/items/red/thumbnail")[1]
    assert thumbnail["cache-control"] == "private, no-cache"
    assert thumbnail["x-content-type-options"] == "nosniff"


def test_every_response_names_the_server_without_a_version() -> None:
    h = Harness(metrics_here=False, runner=FakeRunner(), max_queue=1)
    answers = [
        h.request("GET", "/healthz"),
        h.request("GET", "/"),
        h.request("GET", "/v1/nowhere"),
        h.request("PUT", "/v1/embed"),
    ]
    h.post("/v1/embed", RED)  # runs: the FakeRunner never finishes it
    h.post("/v1/embed", RED)  # fills the queue
    answers.append(h.post_image("/v1/embed", RED))  # refused from its headers
    assert [status for status, _, _ in answers] == [200, 200, 404, 405, 503]
    for _, headers, _ in answers:
        assert headers["server"] == "batchserve"
    # The metrics port (--metrics-address) too.
    [metrics_site] = [factory for port, factory, _, _ in h.clock.tcpServers if port == 0]
    response = result_of(SiteClient(metrics_site).request("GET", "/metrics"))
    assert response.code == 200 and response.headers["server"] == "batchserve"


def test_no_unauthenticated_answer_gives_the_softwares_version() -> None:
    # The API document and the v2 server metadata are open to all: each gives its
    # protocol's version, never the software's (the start-up log has it).
    h = Harness(metrics_here=False, runner=FakeRunner())
    answers = {path: h.request("GET", path) for path in ("/openapi.json", "/docs", "/v2")}
    for path, (status, _, body) in answers.items():
        text = body.decode() if isinstance(body, bytes) else json.dumps(body)
        assert status == 200 and __version__ not in text, path
    assert answers["/openapi.json"][2]["info"]["version"] == "1"
    assert answers["/v2"][2]["version"] == "2"
