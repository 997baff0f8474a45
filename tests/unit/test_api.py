"""The HTTP API through the real Site in memory: the server graph from the builder (Klein
routes, service, Batcher, pipeline, catalog, FAISS), a fake model run synchronously. No
reactor, no sockets."""

from __future__ import annotations

import base64
import tempfile
import time
from datetime import datetime
from json import dumps, loads
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from batchserve.config import ServerSettings, ServeSettings
from batchserve.http.auth import Tokens
from batchserve.http.bodies import RequestLimits
from batchserve.models.batches import Prediction
from batchserve.models.images import DecodeLimits, decode_image
from batchserve.server import Threads, build
from batchserve.serving.batching import BatchPolicy
from batchserve.serving.inference import InferenceWorker
from batchserve.serving.metrics import Metrics, MetricsPage
from batchserve.serving.records import AddTask, SearchRequest, SearchTask
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import MAX_METADATA_DEPTH
from batchserve.storage.store import ItemStore
from batchserve.testing import (
    FakeModel,
    FakeRunner,
    Response,
    SiteClient,
    SyncModelRunner,
    encode_image,
    encode_multipart,
    result_of,
    run_now,
)
from tests.unit.test_store import SharedCatalog

URL = "http://127.0.0.1/"
RED = encode_image(colour=(220, 20, 20))
BLUE = encode_image(fmt="PNG", colour=(20, 20, 220))


class ModelVia:
    """The fake model's thread, with its batches run by ``runner`` (which may hold them)."""

    def __init__(self, worker: SyncModelRunner, runner: Any) -> None:
        self.worker = worker
        self.runner = runner
        self.sizes = worker.sizes

    @property
    def info(self) -> Any:
        return self.worker.info

    @property
    def ready(self) -> bool:
        return self.worker.ready

    def start(self) -> Deferred[Any]:
        return self.worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.worker.stop(timeout_s)

    def run(self, batch: Any) -> Deferred[Any]:
        return self.runner.run(batch)  # type: ignore[no-any-return]


class Harness:
    """The real server graph, built by the server's builder: API, Site, service, Batcher,
    pipeline, catalog and FAISS index, with a fake model; every "thread" runs at once on the
    test's thread, and HTTP goes through the real Site in memory."""

    def __init__(
        self,
        runner: Any = None,
        ready: bool = True,
        hold: bool = False,
        tokens: Tokens | None = None,
        metrics_here: bool = True,
        model: Any = None,
        max_queue: int = 512,
        timeout_s: float = 10.0,
        index_thread: Any = None,
        refusals_per_image: float = 3.0,
        catalog: Any = None,
    ) -> None:
        self.model = FakeModel()
        self.directory = tempfile.TemporaryDirectory()
        worker = SyncModelRunner(self.model, loaded=False)
        self.runner = runner if runner is not None else Held(worker) if hold else worker
        tokens = tokens or Tokens()
        settings = ServeSettings(
            server=ServerSettings(
                workers="0",
                api_token=tokens.api,
                write_token=tokens.write,
                metrics_address="" if metrics_here else "127.0.0.1:0",
                refusals_per_image=refusals_per_image,
            ),
            limits=RequestLimits(max_body_bytes=200_000, max_images=3),
            images=DecodeLimits(max_pixels=1_000_000),
            batching=BatchPolicy(max_queue=max_queue, timeout_s=timeout_s),
            store=StoreSettings(demo=False),
        )
        self.clock = MemoryReactorClock()
        self.server = build(
            settings,
            self.clock,
            model=model or ModelVia(worker, self.runner),
            threads=Threads(decode=run_now, store=index_thread or run_now),
            store=lambda info: ItemStore(
                Path(self.directory.name),
                VectorIndex(info.dim, IndexParams()),
                info.fingerprint(),
                catalog=catalog,
            ),
        )
        self.batcher = self.server.batcher
        self.service = self.server.service
        self.index = self.server.store
        self.metrics = self.server.metrics
        self.api = self.server.api
        if ready:
            assert result_of(self.server.start()) is None
        self.client = SiteClient(self.server.site)

    def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Deferred[Response]:
        """Send a request; its Deferred fires (on ``flush``) once it is answered."""
        return self.client.request(method, path, body, headers)

    def post(self, path: str, data: bytes, ctype: str = "image/jpeg") -> Deferred[Response]:
        return self.send("POST", path, data, {"Content-Type": ctype})

    def flush(self) -> None:
        self.client.flush()

    def request(
        self,
        method: str,
        path: str,
        data: bytes = b"",
        headers: dict[str, str] | None = None,
        json: Any = None,
    ) -> tuple[int, dict[str, str], Any]:
        if json is not None:
            data = dumps(json).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        response = result_of(self.send(method, path, data, headers))
        try:
            doc = loads(response.body)
        except ValueError:
            doc = response.body
        return response.code, response.headers, doc

    def post_image(self, path: str, data: bytes, ctype: str = "image/jpeg") -> Any:
        return self.request("POST", path, data, {"Content-Type": ctype})


def embedding_of(h: Harness, data: bytes) -> np.ndarray:
    """The fake model's embedding of ``data`` computed directly, without the server."""
    array = decode_image(data, (32, 32), DecodeLimits())
    return h.model.predict(array[None]).embeddings[0]


def test_embed_raw_body_returns_one_unit_embedding() -> None:
    h = Harness()
    code, headers, doc = h.post_image("/v1/embed", RED)
    assert code == 200 and headers["content-type"] == "application/json"
    assert doc["model"] == "fake" and doc["dim"] == 8
    [result] = doc["results"]
    vector = np.array(result["embedding"])
    assert vector.shape == (8,)
    np.testing.assert_allclose(vector, embedding_of(h, RED), atol=1e-6)


def test_embed_multipart_with_several_files_keeps_request_order() -> None:
    h = Harness()
    body, ctype = encode_multipart([("image", "a.jpg", RED), ("image", "b.png", BLUE)])
    code, _, doc = h.post_image("/v1/embed", body, ctype)
    assert code == 200
    got = [np.array(r["embedding"]) for r in doc["results"]]
    np.testing.assert_allclose(got[0], embedding_of(h, RED), atol=1e-6)
    np.testing.assert_allclose(got[1], embedding_of(h, BLUE), atol=1e-6)


def test_a_stray_multipart_field_is_a_400_naming_it() -> None:
    h = Harness()
    body, ctype = encode_multipart([("image", "a.jpg", RED)], fields={"lable": "cat"})
    code, _, doc = h.post_image("/v1/items?id=a", body, ctype)
    assert code == 400 and "'lable'" in doc["error"]["message"]
    assert h.request("GET", "/v1/items/a")[0] == 404  # nothing was added
    code, _, doc = h.post_image("/v1/embed", body, ctype)
    assert code == 400 and "takes no text field" in doc["error"]["message"]


def test_several_images_enter_the_batcher_as_separate_items() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    body = dumps({"images": [{"b64": base64.b64encode(x).decode()} for x in (RED, BLUE, RED)]})
    d = h.post("/v1/embed", body.encode(), "application/json")
    assert runner.sizes == [1]  # the first went to the idle runner alone
    assert h.batcher.queued == 2
    runner.complete(lambda _img: _prediction())
    runner.complete(lambda _img: _prediction())
    h.flush()
    assert runner.sizes == [1, 2]
    assert result_of(d).code == 200


def _prediction() -> Any:
    return Prediction(np.ones(8, dtype=np.float32) / np.sqrt(8), None)


def test_embed_json_base64_and_data_url() -> None:
    h = Harness()
    b64 = base64.b64encode(BLUE).decode()
    body = {"images": [{"b64": b64}, {"b64": "data:image/png;base64," + b64}]}
    code, _, doc = h.request("POST", "/v1/embed", json=body)
    assert code == 200 and len(doc["results"]) == 2
    for result in doc["results"]:
        np.testing.assert_allclose(result["embedding"], embedding_of(h, BLUE), atol=1e-6)


def test_classify_returns_top_k_labels_best_first() -> None:
    h = Harness()
    green = colour(5, 250, 5)  # its most likely class is the last one, not the first
    code, _, doc = h.post_image("/v1/classify?k=2", green, "image/png")
    assert code == 200
    array = decode_image(green, (32, 32), DecodeLimits())
    probabilities = h.model.predict(array[None]).probabilities
    assert probabilities is not None
    best = np.argsort(-probabilities[0])[:2]
    assert best[0] != 0
    classes = h.model.info.classes or []
    expected = [(classes[i], pytest.approx(float(probabilities[0][i]), abs=1e-6)) for i in best]
    assert [(x["label"], x["score"]) for x in doc["results"][0]["labels"]] == expected


@pytest.mark.parametrize(
    ("ctype", "body", "status", "code"),
    [
        ("text/plain", b"hello", 415, "unsupported_media_type"),
        (None, RED, 415, "unsupported_media_type"),
        ("image/jpeg", b"", 400, "invalid_input"),
        ("image/jpeg", b"not an image", 400, "invalid_input"),
        ("image/tiff", encode_image(fmt="TIFF"), 415, "unsupported_media_type"),
        ("application/json", b"{not json", 400, "invalid_input"),
        ("application/json", b'{"images": [{"b64": "%%%"}]}', 400, "invalid_input"),
        ("application/json", b'{"images": "x"}', 400, "invalid_input"),
        ("application/json", b'{"images": []}', 400, "invalid_input"),
        ("multipart/form-data; boundary=xyz", b"--xyz--\r\n", 400, "invalid_input"),
        ("image/png", b"\0" * 200_001, 413, "payload_too_large"),
        ("image/png", encode_image(fmt="PNG", size=(2000, 1000)), 413, "payload_too_large"),
    ],
    ids=[
        "text",
        "no-type",
        "empty",
        "garbage",
        "tiff",
        "bad-json",
        "bad-b64",
        "not-list",
        "no-images",
        "multipart-no-file",
        "body-too-large",
        "too-many-pixels",
    ],
)
def test_bad_input_gets_a_clear_json_4xx(
    ctype: str | None, body: bytes, status: int, code: str
) -> None:
    h = Harness()
    headers = {"Content-Type": ctype} if ctype else {}
    got_status, _, doc = h.request("POST", "/v1/embed", data=body, headers=headers)
    assert got_status == status
    assert doc["error"]["code"] == code and doc["error"]["message"]
    # and the server goes on
    assert h.post_image("/v1/embed", RED)[0] == 200


def test_more_images_than_the_limit_is_413() -> None:
    h = Harness()
    body, ctype = encode_multipart([("image", f"{i}.jpg", RED) for i in range(4)])
    status, _, doc = h.post_image("/v1/embed", body, ctype)
    assert status == 413 and "limit is 3" in doc["error"]["message"]


def test_full_queue_is_503_with_retry_after() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, max_queue=1)
    h.post("/v1/embed", RED)
    h.clock.advance(9.0)
    runner.complete(lambda _job: _prediction())  # a batch that took 9 s
    h.post("/v1/embed", RED)
    h.post("/v1/embed", RED)
    status, headers, doc = h.post_image("/v1/embed", RED)
    assert status == 503 and doc["error"]["code"] == "overloaded"
    # One batch in flight and one image queued, at 0.8 x 0.05 + 0.2 x 9 = 1.84 s a batch:
    # ceil((1 / 32 + 1) x 1.84) = 2 seconds.
    assert headers["retry-after"] == "2" == str(h.batcher.retry_after_s())
    assert 'batchserve_rejected_total{reason="queue_full"} 1.0' in h.metrics.render().decode()


def test_a_request_is_refused_from_its_headers_by_its_own_shorter_deadline() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    h.post("/v1/embed", RED)
    h.clock.advance(2.0)
    runner.complete(lambda _job: _prediction())  # an image took 2 s: 0.4 s an image
    h.post("/v1/embed", RED)  # in flight
    h.post("/v1/embed", RED)  # queued: 2 x 0.4 s ahead of the next request
    from tests.unit.test_early_token import requests_of
    from tests.unit.test_site import Connection

    made = requests_of(h.server.site)
    connection = Connection(h.server.site)
    connection.send(
        "POST /v1/embed HTTP/1.1\nHost: localhost\nContent-Type: image/jpeg\n"
        f"X-Timeout-Ms: 1000\nContent-Length: {len(RED)}\n\n",
        RED,
    )
    [request] = made
    assert request.early_answer is not None  # answered from its headers, its body dropped
    [(status, _, doc)] = connection.responses()
    assert status == 503 and "wait about 0.8 s of the 1 s deadline" in doc["error"]["message"]
    assert not h.post("/v1/embed", RED).called  # the server's 10 s: admitted, it waits


def test_deadline_passed_is_504() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, timeout_s=0.5)
    d = h.post("/v1/embed", RED)
    h.flush()
    h.clock.advance(0.6)
    h.flush()
    response = result_of(d)
    assert response.code == 504


def test_model_failure_is_500_for_that_request_only() -> None:
    h = Harness()
    h.model.fail_next = RuntimeError("cuda error")
    status, _, doc = h.post_image("/v1/embed", RED)
    assert status == 500 and doc["error"]["code"] == "inference_failed"
    assert h.post_image("/v1/embed", RED)[0] == 200


def test_not_ready_is_503_and_readyz_says_so() -> None:
    h = Harness(ready=False)
    status, headers, doc = h.post_image("/v1/embed", RED)
    assert status == 503 and doc["error"]["code"] == "not_ready" and "retry-after" in headers
    assert h.request("GET", "/readyz")[0] == 503
    assert h.request("GET", "/healthz")[0] == 200


def test_a_replica_rebuilding_its_index_is_not_ready_and_says_so() -> None:
    h = Harness()
    store = h.server.store._store
    assert store is not None and h.request("GET", "/readyz")[0] == 200
    store.rebuilding = True  # as the store thread sets it while it rebuilds
    status, _, doc = h.request("GET", "/readyz")
    assert (status, doc["status"]) == (503, "rebuilding")
    status, _, doc = h.post_image("/v1/search", RED)
    assert status == 503 and "the index is rebuilding" in doc["error"]["message"]
    store.rebuilding = False
    assert h.request("GET", "/readyz")[0] == 200


def test_readyz_says_why_a_shared_catalog_is_out_of_reach_and_stays_200_for_reads() -> None:
    assert "catalog" not in Harness().request("GET", "/readyz")[2]  # its own SQLite catalog
    with tempfile.TemporaryDirectory() as shared:
        catalog = SharedCatalog(Path(shared) / "catalog.sqlite3", dim=FakeModel().info.dim)
        h = Harness(catalog=catalog)
        assert add(h, "red", RED)[0] == 200
        assert h.request("GET", "/readyz")[::2] == (200, {"status": "ready", "catalog": "ok"})
        catalog.down = True  # hung: PostgresCatalog's calls fail after its bound
        status, headers, doc = add(h, "blue", BLUE)
        assert (status, headers["retry-after"]) == (503, "1")
        assert doc["error"]["code"] == "catalog_unavailable"
        down = {
            "status": "ready",
            "catalog": "unavailable",
            "catalog_reason": "no answer within 7 s",
        }
        assert h.request("GET", "/readyz")[::2] == (200, down)
        assert h.request("GET", "/v1/items/red")[0] == 200  # from memory
        found = h.post_image("/v1/search?k=1", RED)[2]
        assert found["results"][0]["matches"][0]["id"] == "red"
        catalog.down = False
        assert h.request("GET", "/readyz")[2] == down  # until the follower's next pass ...
        result_of(h.server.store.call(ItemStore.catch_up))  # ... finds it back
        assert h.request("GET", "/readyz")[::2] == (200, {"status": "ready", "catalog": "ok"})
        assert add(h, "blue", BLUE)[0] == 200


def test_a_404_for_an_id_with_a_slash_says_to_write_it_as_2f() -> None:
    h = Harness()
    for path, encoded in [
        ("/v1/items/sample/cat", "/v1/items/sample%2Fcat"),
        ("/v1/items/a/b/similar", "/v1/items/a%2Fb"),
    ]:
        status, _, doc = h.request("GET", path)
        assert status == 404 and encoded in doc["error"]["message"], doc
        assert "%2F" in doc["error"]["message"]
    status, _, doc = h.request("GET", "/v1/nowhere/at/all")
    assert status == 404 and "%2F" not in doc["error"]["message"]


def test_readyz_model_and_healthz_when_ready() -> None:
    h = Harness()
    assert h.request("GET", "/readyz")[0] == 200
    status, _, doc = h.request("GET", "/v1/model")
    assert status == 200
    assert doc["name"] == "fake" and doc["dim"] == 8 and doc["input_size"] == [32, 32]
    assert doc["classes"] == ["cat", "dog", "car"] and doc["pretrained"] is False
    assert doc["embedding"] == {"pooling": "avg", "fit": "squash", "trim_borders": False}


def test_unknown_route_and_wrong_method_are_json_errors() -> None:
    h = Harness()
    status, _, doc = h.request("GET", "/nope")
    assert status == 404 and doc["error"]["code"] == "not_found"
    status, _, doc = h.request("GET", "/v1/embed")
    assert status == 405 and doc["error"]["code"] == "method_not_allowed"


def test_k_out_of_range_is_400() -> None:
    h = Harness()
    assert h.post_image("/v1/classify?k=0", RED)[0] == 400
    assert h.post_image("/v1/classify?k=abc", RED)[0] == 400


def test_metrics_show_requests_batches_and_queue_wait() -> None:
    h = Harness()
    h.post_image("/v1/embed", RED)
    h.post_image("/v1/embed", b"junk")
    status, headers, text = h.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = text.decode() if isinstance(text, bytes) else str(text)
    assert 'batchserve_requests_total{code="200",route="/v1/embed"} 1.0' in text
    assert 'batchserve_requests_total{code="400",route="/v1/embed"} 1.0' in text
    assert "batchserve_batch_size_count 1.0" in text
    assert "batchserve_queue_wait_seconds_count 1.0" in text
    assert "batchserve_decode_seconds_count 1.0" in text  # the junk failed before it counted


def test_client_hanging_up_removes_its_queued_items() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    h.post("/v1/embed", RED)
    d = h.service.embed(lambda: [RED, BLUE])
    assert h.batcher.queued == 2
    d.cancel()  # what Klein does to the handler's Deferred when the connection drops
    assert h.batcher.queued == 0
    runner.complete(lambda _img: _prediction())
    assert runner.sizes == [1]  # the dropped images never reached the model


def add(h: Harness, item_id: str, image: bytes, label: str | None = None, **meta: Any) -> Any:
    fields = {"id": item_id, "metadata": dumps(meta)}
    if label:
        fields["label"] = label
    body, ctype = encode_multipart([("image", f"{item_id}.png", image)], fields=fields)
    return h.post_image("/v1/items", body, ctype)


def colour(r: int, g: int, b: int) -> bytes:
    return encode_image(fmt="PNG", colour=(r, g, b))


def test_added_item_is_found_by_search_read_and_deleted() -> None:
    h = Harness()
    started = time.time()
    status, _, doc = add(h, "red-1", RED, "reds", sku=7)
    assert status == 200 and doc["added"] == ["red-1"]
    add(h, "blue-1", BLUE, "blues")
    status, _, doc = h.post_image("/v1/search?k=2", RED)
    assert status == 200
    matches = doc["results"][0]["matches"]
    assert [m["id"] for m in matches] == ["red-1", "blue-1"]
    assert matches[0]["label"] == "reds" and matches[0]["metadata"] == {"sku": 7}
    assert matches[0]["score"] > matches[1]["score"]

    status, _, item = h.request("GET", "/v1/items/red-1")
    assert status == 200 and item["id"] == "red-1" and item["metadata"] == {"sku": 7}
    created = datetime.fromisoformat(item["created"]).timestamp()
    assert item["created"].endswith("Z") and int(started) <= created <= time.time()
    assert h.request("DELETE", "/v1/items/red-1")[2] == {"deleted": "red-1"}
    assert h.request("GET", "/v1/items/red-1")[0] == 404
    assert h.request("DELETE", "/v1/items/red-1")[0] == 404
    _, _, doc = h.post_image("/v1/search?k=5", RED)
    assert [m["id"] for m in doc["results"][0]["matches"]] == ["blue-1"]


def test_adding_an_existing_id_replaces_it() -> None:
    h = Harness()
    add(h, "x", RED, "reds")
    add(h, "x", BLUE, "blues")
    _, _, doc = h.post_image("/v1/search?k=5", BLUE)
    matches = doc["results"][0]["matches"]
    assert [m["id"] for m in matches] == ["x"] and matches[0]["label"] == "blues"
    assert matches[0]["score"] > 0.999


def test_json_items_with_base64() -> None:
    h = Harness()
    items = [
        {
            "id": f"c{i}",
            "label": "l",
            "metadata": {"n": i},
            "b64": base64.b64encode(colour(40 * i, 10, 10)).decode(),
        }
        for i in range(3)
    ]
    status, _, doc = h.request("POST", "/v1/items", json={"items": items})
    assert status == 200 and doc["added"] == ["c0", "c1", "c2"]
    assert h.request("GET", "/v1/index")[2]["size"] == 3


def test_one_undecodable_image_fails_the_request_before_any_image_is_stored() -> None:
    h = Harness()
    good = base64.b64encode(colour(40, 10, 10)).decode()
    bad = base64.b64encode(b"not an image at all").decode()
    items = [{"id": "kept-out", "b64": good}, {"id": "broken", "b64": bad}]
    status, _, doc = h.request("POST", "/v1/items", json={"items": items})
    assert status == 400 and doc["error"]["code"] == "invalid_input"
    assert h.request("GET", "/v1/items/kept-out")[0] == 404
    assert h.model.batch_shapes == []  # the model never saw the good image either
    assert h.request("GET", "/v1/index")[2]["calls"]["add"] == 0


def test_search_options_k_min_score_and_label() -> None:
    h = Harness()
    for i in range(6):
        add(h, f"i{i}", colour(30 * i, 100, 50), "even" if i % 2 == 0 else "odd")
    _, _, doc = h.post_image("/v1/search?k=3", colour(0, 100, 50))
    assert len(doc["results"][0]["matches"]) == 3
    _, _, doc = h.post_image("/v1/search?k=10&label=odd", colour(0, 100, 50))
    assert {m["label"] for m in doc["results"][0]["matches"]} == {"odd"}
    assert len(doc["results"][0]["matches"]) == 3
    _, _, doc = h.post_image("/v1/search?k=10&min_score=0.9999", colour(0, 100, 50))
    assert [m["id"] for m in doc["results"][0]["matches"]] == ["i0"]


def test_same_class_searches_only_within_the_predicted_class() -> None:
    h = Harness()
    colours = [
        colour(250, 5, 5),
        colour(5, 250, 5),
        colour(5, 5, 250),
        colour(200, 200, 5),
        colour(5, 200, 200),
        colour(200, 5, 200),
    ]
    for i, image in enumerate(colours):
        add(h, f"c{i}", image)
    for query in colours:
        _, _, doc = h.post_image("/v1/classify?k=1", query)
        predicted = doc["results"][0]["labels"][0]["label"]
        _, _, doc = h.post_image("/v1/search?k=10&same_class=true", query)
        matches = doc["results"][0]["matches"]
        assert matches and {m["class"] for m in matches} == {predicted}


def test_search_by_vector_and_similar() -> None:
    h = Harness()
    add(h, "red", RED)
    add(h, "blue", BLUE)
    vector = embedding_of(h, RED).tolist()
    status, _, doc = h.request("POST", "/v1/search", json={"vectors": [vector], "k": 1})
    assert status == 200 and doc["results"][0]["matches"][0]["id"] == "red"
    status, _, doc = h.request("GET", "/v1/items/red/similar?k=5")
    assert status == 200 and [m["id"] for m in doc["results"][0]["matches"]] == ["blue"]
    assert h.request("GET", "/v1/items/nope/similar")[0] == 404


@pytest.mark.parametrize(
    "body",
    [
        {"vectors": [[1.0, 2.0]]},
        {"vectors": [[float("nan")] * 8]},
        {"vectors": [[0.0] * 8]},
        {"vectors": "x"},
        {"vectors": []},
        {"vectors": [[1.0] * 8], "k": 0},
        {"vectors": [[1.0] * 8], "min_score": "high"},
    ],
    ids=["wrong-dim", "nan", "zero", "not-list", "empty", "k-zero", "bad-min-score"],
)
def test_bad_vector_searches_are_400(body: dict[str, Any]) -> None:
    h = Harness()
    data = dumps(body).replace("NaN", "NaN").encode()
    status, _, doc = h.post_image("/v1/search", data, "application/json")
    assert status == 400 and doc["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "id"),
        ({"id": ""}, "id"),
        ({"id": "x" * 300}, "limit"),
        ({"id": "a\x00b"}, "control"),
        ({"id": "a", "metadata": "[1, 2]"}, "JSON object"),
        ({"id": "a", "metadata": "{bad"}, "invalid JSON"),
    ],
)
def test_bad_items_are_refused_with_a_clear_message(fields: dict[str, str], message: str) -> None:
    h = Harness()
    body, ctype = encode_multipart([("image", "a.png", RED)], fields=fields)
    status, _, doc = h.post_image("/v1/items", body, ctype)
    assert status in (400, 413) and message in doc["error"]["message"]
    assert h.request("GET", "/v1/index")[2]["size"] == 0


def nested(levels: int) -> str:
    """Metadata of ``levels`` levels as JSON: objects, each inside the one before, a list
    innermost (written by hand: the json module recurses)."""
    return '{"in":' * (levels - 2) + '{"leaf":[1]}' + "}" * (levels - 2)


@pytest.mark.parametrize("how", ["multipart", "json"])
def test_metadata_nested_past_the_limit_is_refused_as_400_naming_it(how: str) -> None:
    h = Harness()

    def add_with(item_id: str, metadata: str) -> tuple[int, Any]:
        if how == "multipart":
            fields = {"id": item_id, "metadata": metadata}
            body, ctype = encode_multipart([("image", "a.png", RED)], fields=fields)
        else:
            b64 = base64.b64encode(RED).decode()
            entry = f'{{"id": "{item_id}", "b64": "{b64}", "metadata": {metadata}}}'
            body = f'{{"items": [{entry}]}}'.encode()
            ctype = "application/json"
        status, _, doc = h.post_image("/v1/items", body, ctype)
        return status, doc

    assert MAX_METADATA_DEPTH == 32
    assert add_with("at-limit", nested(32))[0] == 200
    assert h.request("GET", "/v1/items/at-limit")[2]["metadata"] == loads(nested(32))
    for levels in (33, 300, 1000):
        status, doc = add_with(f"over-{levels}", nested(levels))
        assert status == 400 and doc["error"]["code"] == "invalid_input", levels
        assert "the limit is 32" in doc["error"]["message"] and "nested" in doc["error"]["message"]
    assert h.request("GET", "/v1/index")[2]["size"] == 1


class Held:
    """Wraps the real pipeline and holds each batch until the test releases it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.waiting: list[tuple[Any, Deferred[Any]]] = []
        self.sizes: list[int] = []

    def run(self, batch: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((batch, d))
        self.sizes.append(len(batch))
        return d

    def release_all(self) -> None:
        while self.waiting:
            batch, d = self.waiting.pop(0)
            self.inner.run(batch).chainDeferred(d)


def test_one_batch_of_searches_is_one_index_search() -> None:
    h = Harness(hold=True)
    held = h.runner
    assert isinstance(held, Held)
    added = h.service.add(lambda: [(colour(60 * i, 0, 0), AddTask(f"r{i}")) for i in range(4)])
    held.release_all()
    assert result_of(added) == ["r0", "r1", "r2", "r3"]

    def calls() -> int:
        return int(result_of(h.index.call(lambda store: store.index.calls["search"])))

    before = calls()
    searches = [
        h.service.search(lambda i=i: SearchRequest(SearchTask(k=2), images=[colour(60 * i, 0, 0)]))
        for i in range(5)
    ]
    held.release_all()
    assert held.sizes[-2:] == [1, 4]  # the first alone (model idle), the other four together
    assert all(len(result_of(s)[0]) == 2 for s in searches)
    assert calls() - before == 2  # one index search per batch, not one per request


class HeldThread:
    """Stands in for the index thread, running each call only when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []
        self.hold = False

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        if not self.hold:
            return maybeDeferred(f, *args)
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)


def test_searches_wait_for_a_busy_index_in_one_growing_batch() -> None:
    thread = HeldThread()  # the index thread, run when the test says
    h = Harness(index_thread=thread)
    sizes = h.runner.batch_sizes
    add(h, "a", RED)
    thread.hold = True
    first = h.service.search(
        lambda: SearchRequest(SearchTask(k=1), images=[RED])
    )  # model, then held in the index stage
    second = h.service.search(lambda: SearchRequest(SearchTask(k=1), images=[BLUE]))
    assert sizes == [1, 1, 1]  # add, first, second: the model was free, the next ran at once
    waiting = [
        h.service.search(lambda: SearchRequest(SearchTask(k=1), images=[RED])) for _ in range(5)
    ]
    assert sizes[-1] == 1 and h.batcher.queued == 5  # the second holds its slot meanwhile
    thread.run_next()  # the first batch's search finishes
    assert len(result_of(first)) == 1 and sizes[-1] == 5  # the five waiting go as one batch
    thread.run_next()
    thread.run_next()
    assert len(result_of(second)) == 1 and all(len(result_of(d)) == 1 for d in waiting)


def test_readyz_is_503_while_the_inference_thread_restarts() -> None:
    from tests.unit.test_inference import ThreadKilled, ThreadReactor, items

    model, reactor = FakeModel(), ThreadReactor()
    worker = InferenceWorker(lambda: model, reactor, [1, 2], warmup=False)  # type: ignore[arg-type]
    h = Harness(model=worker, ready=False)
    started = h.server.start()  # starts the inference thread
    reactor.run_next()  # the model is loaded: the server opens the index, and is ready
    assert result_of(started) is None
    try:
        assert h.request("GET", "/readyz")[0] == 200
        model.fail_next = ThreadKilled()
        worker.run(items(1)[1])
        reactor.run_next()  # the thread died
        assert h.request("GET", "/readyz")[0] == 503
        assert h.request("GET", "/healthz")[0] == 200
        reactor.run_next()  # its replacement runs the loaded model
        assert h.request("GET", "/readyz")[0] == 200
    finally:
        worker.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_with_an_api_token_every_v1_route_needs_it_and_probes_stay_open() -> None:
    h = Harness(tokens=Tokens(api="s3cret"))
    status, headers, doc = h.request("GET", "/v1/index")
    assert status == 401 and doc["error"]["code"] == "unauthorized"
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, doc = h.request("GET", "/v1/index", headers=bearer("wrong"))
    assert status == 403 and doc["error"]["code"] == "forbidden"
    assert h.request("GET", "/v1/index", headers={"Authorization": "Basic czNjcmV0"})[0] == 401
    assert h.request("GET", "/v1/index", headers=bearer("s3cret"))[0] == 200
    status, _, _ = h.request(
        "POST",
        "/v1/embed",
        data=RED,
        headers={"Content-Type": "image/jpeg", **bearer("s3cret")},
    )
    assert status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert h.request("GET", path)[0] == 200, path


def add_as(h: Harness, token: str | None) -> int:
    body, ctype = encode_multipart([("image", "a.jpg", RED)], fields={"id": "a"})
    headers = {"Content-Type": ctype, **(bearer(token) if token else {})}
    return int(h.request("POST", "/v1/items", data=body, headers=headers)[0])


def test_the_write_token_guards_adds_and_deletes_only() -> None:
    h = Harness(tokens=Tokens(write="w-token"))
    assert add_as(h, None) == 401
    assert add_as(h, "x") == 403
    assert add_as(h, "w-token") == 200
    assert h.request("GET", "/v1/items/a")[0] == 200  # reads stay open
    assert h.post_image("/v1/search", RED)[0] == 200
    assert h.request("DELETE", "/v1/items/a")[0] == 401
    assert h.request("DELETE", "/v1/items/a", headers=bearer("w-token"))[0] == 200


def test_with_both_tokens_the_api_token_reads_and_only_the_write_token_writes() -> None:
    h = Harness(tokens=Tokens(api="r", write="w"))
    assert add_as(h, "r") == 403
    assert add_as(h, "w") == 200
    assert h.request("GET", "/v1/items/a", headers=bearer("r"))[0] == 200
    assert h.request("GET", "/v1/items/a", headers=bearer("w"))[0] == 200
    assert h.request("GET", "/v1/items/a")[0] == 401


def test_a_refused_request_never_reaches_the_model() -> None:
    h = Harness(tokens=Tokens(api="s3cret"))
    assert h.post_image("/v1/embed", RED)[0] == 401
    assert h.model.batch_shapes == []


def test_metrics_moved_to_their_own_address_are_404_on_the_api() -> None:
    h = Harness(metrics_here=False)
    status, _, doc = h.request("GET", "/metrics")
    assert status == 404 and "metrics address" in doc["error"]["message"]


def test_once_draining_new_requests_get_503_and_readyz_says_shutting_down() -> None:
    h = Harness()
    h.api.in_flight.drain(30, h.clock)
    status, headers, doc = h.post_image("/v1/embed", RED)
    assert status == 503 and doc["error"]["code"] == "not_ready"
    assert headers["retry-after"] == "1"  # (the client strips the hop-by-hop Connection)
    status, _, doc = h.request("GET", "/readyz")
    assert status == 503 and doc["status"] == "shutting down"
    assert h.model.batch_shapes == []


def test_a_request_in_flight_is_counted_until_it_is_answered() -> None:
    h = Harness(hold=True)
    d = h.post("/v1/embed", RED)
    h.flush()
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert h.api.in_flight.count == 1 and answered == []
    h.runner.release_all()
    h.flush()
    assert h.api.in_flight.count == 0 and answered[0].code == 200


def test_a_stalled_model_call_does_not_stall_the_server() -> None:
    h = Harness(hold=True, timeout_s=0.5)  # the model never returns until released
    running = h.post("/v1/embed", RED)
    h.flush()
    h.clock.advance(0.2)
    queued = h.post("/v1/embed", RED)  # waits behind the stalled batch
    h.flush()
    assert h.request("GET", "/healthz")[0] == 200
    h.clock.advance(0.31)  # the first deadline passes
    h.flush()
    assert result_of(running).code == 504
    h.clock.advance(0.2)  # the second one's too, without ever reaching the model
    h.flush()
    assert result_of(queued).code == 504 and h.runner.sizes == [1]
    h.runner.release_all()  # the stalled call returns at last: its result is dropped
    h.flush()
    after = h.post("/v1/embed", RED)
    h.flush()
    h.runner.release_all()
    h.flush()
    assert result_of(after).code == 200 and h.runner.sizes == [1, 1]


def test_a_refused_request_during_drain_closes_its_connection() -> None:
    from twisted.internet.testing import StringTransport

    h = Harness()
    h.api.in_flight.drain(30, h.clock)
    channel = h.server.site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST /v1/embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(RED)}\r\n\r\n".encode()
        + RED
    )
    sent = transport.value()
    assert sent.startswith(b"HTTP/1.1 503") and b"Connection: close" in sent
    assert transport.disconnecting


def test_the_metrics_page_serves_only_metrics() -> None:
    metrics = Metrics()
    page = StubTreq(MetricsPage(metrics))
    response = result_of(page.get(URL + "metrics"))
    assert response.code == 200
    assert b"batchserve_queue_items" in result_of(page.content(response))
    assert result_of(page.get(URL + "v1/index")).code == 404


def test_a_verified_search_puts_the_verified_copy_first_with_its_evidence() -> None:
    """Items stored with their local features; a rotated crop of one asked with
    verify=true finds it verified, the others not; a vector cannot be verified; similar
    items verify against the stored item's own features."""
    from tests.unit.test_verification import picture, rotated_crop
    from tests.unit.test_verified_search import jpeg

    h = Harness()
    for n in (1, 2, 3):
        add(h, f"p{n}", jpeg(picture(n)))
    query = jpeg(rotated_crop(picture(2)))
    status, _, doc = h.post_image("/v1/search?k=3&verify=true", query)
    assert status == 200, doc
    matches = doc["results"][0]["matches"]
    assert matches[0]["id"] == "p2" and matches[0]["verified"] is True
    assert matches[0]["inliers"] >= 18 and matches[0]["transform"] == "similarity"
    assert [m["verified"] for m in matches[1:]] == [False, False]
    assert doc["timings_ms"]["verify"] > 0
    _, _, plain = h.post_image("/v1/search?k=3", query)
    assert "verified" not in plain["results"][0]["matches"][0]

    vector = embedding_of(h, query).tolist()
    status, _, doc = h.request("POST", "/v1/search", json={"vectors": [vector], "verify": True})
    assert status == 400 and "verify needs query images" in doc["error"]["message"]

    # The copy decision: each image's verified copies only, possibly none.
    body, ctype = encode_multipart(
        [("image", "a.jpg", query), ("image", "b.jpg", jpeg(picture(9)))]
    )
    status, _, doc = h.post_image("/v1/duplicates", body, ctype)
    assert status == 200, doc
    [found, none] = doc["results"]
    assert [(c["id"], c["verified"]) for c in found["copies"]] == [("p2", True)]
    assert none == {"copies": []} and doc["timings_ms"]["verify"] > 0

    add(h, "copy", query)
    status, _, doc = h.request("GET", "/v1/items/p2/similar?k=2&verify=true")
    similar = doc["results"][0]["matches"]
    assert status == 200 and [(m["id"], m["verified"]) for m in similar] == [
        ("copy", True),
        (similar[1]["id"], False),
    ]
