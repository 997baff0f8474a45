"""The HTTP API through StubTreq: real Klein routes and service, a fake model run
synchronously. No reactor, no sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from batchserve.api import BatchserveAPI, configure_site
from batchserve.batching import Batcher, BatchPolicy
from batchserve.bodies import RequestLimits
from batchserve.images import DecodeLimits, decode_image
from batchserve.metrics import Metrics
from batchserve.models import ModelInfo
from batchserve.service import ImageService
from batchserve.testing import (
    FakeModel,
    FakeRunner,
    SyncModelRunner,
    encode_image,
    encode_multipart,
)

URL = "http://127.0.0.1/"
RED = encode_image(colour=(220, 20, 20))
BLUE = encode_image(fmt="PNG", colour=(20, 20, 220))


class Ready:
    def __init__(self, info: ModelInfo | None) -> None:
        self.info = info


class Harness:
    def __init__(self, runner: Any = None, ready: bool = True, **policy: Any) -> None:
        self.model = FakeModel()
        self.runner = runner if runner is not None else SyncModelRunner(self.model)
        self.clock = Clock()
        self.metrics = Metrics()
        self.batcher: Batcher[Any, Any] = Batcher(
            self.runner, BatchPolicy(**policy), self.clock, self.metrics
        )
        self.service = ImageService(
            self.batcher,
            lambda f, *a: maybeDeferred(f, *a),
            Ready(self.model.info if ready else None),
            DecodeLimits(max_pixels=1_000_000),
            self.clock,
            observer=self.metrics,
        )
        api = BatchserveAPI(
            self.service, self.metrics, RequestLimits(max_body_bytes=200_000, max_images=3)
        )
        self.treq = StubTreq(api.resource())
        # StubTreq builds its own Site; configure it as the server does.
        configure_site(self.treq._agent._serverFactory, 200_000, access_log=False)

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
        d = self.treq.request(method, URL + path.lstrip("/"), **kwargs)
        self.treq.flush()
        response = result_of(d)
        body_d = self.treq.content(response)
        self.treq.flush()
        body = result_of(body_d)
        headers = {
            k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()
        }
        try:
            doc = json.loads(body)
        except ValueError:
            doc = body
        return response.code, headers, doc

    def post_image(self, path: str, data: bytes, ctype: str = "image/jpeg") -> Any:
        return self.request("POST", path, data=data, headers={"Content-Type": ctype})


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no response"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


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
    body, ctype = encode_multipart(
        [("image", "a.jpg", RED), ("image", "b.png", BLUE)], fields={"note": "not an image"}
    )
    code, _, doc = h.post_image("/v1/embed", body, ctype)
    assert code == 200
    got = [np.array(r["embedding"]) for r in doc["results"]]
    np.testing.assert_allclose(got[0], embedding_of(h, RED), atol=1e-6)
    np.testing.assert_allclose(got[1], embedding_of(h, BLUE), atol=1e-6)


def test_several_images_enter_the_batcher_as_separate_items() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    body = json.dumps({"images": [{"b64": base64.b64encode(x).decode()} for x in (RED, BLUE, RED)]})
    d = h.treq.post(
        URL + "v1/embed", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    h.treq.flush()
    assert runner.sizes == [1]  # the first went to the idle runner alone
    assert h.batcher.queued == 2
    runner.complete(lambda _img: _prediction())
    runner.complete(lambda _img: _prediction())
    h.treq.flush()
    assert runner.sizes == [1, 2]
    assert result_of(d).code == 200


def _prediction() -> Any:
    from batchserve.inference import Prediction

    return Prediction(np.ones(8, dtype=np.float32) / np.sqrt(8), None)


def test_embed_json_base64_and_data_url() -> None:
    h = Harness()
    b64 = base64.b64encode(BLUE).decode()
    body = {"images": [{"b64": b64}, {"b64": "data:image/png;base64," + b64}]}
    code, _, doc = h.request("POST", "/v1/embed", json=body)
    assert code == 200 and len(doc["results"]) == 2
    assert doc["results"][0] == doc["results"][1]


def test_classify_returns_top_k_labels_best_first() -> None:
    h = Harness()
    code, _, doc = h.post_image("/v1/classify?k=2", RED)
    assert code == 200
    labels = doc["results"][0]["labels"]
    assert len(labels) == 2
    assert {x["label"] for x in labels} <= {"cat", "dog", "car"}
    assert labels[0]["score"] >= labels[1]["score"]


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
    h.treq.post(URL + "v1/embed", data=RED, headers={"Content-Type": "image/jpeg"})
    h.treq.post(URL + "v1/embed", data=RED, headers={"Content-Type": "image/jpeg"})
    status, headers, doc = h.post_image("/v1/embed", RED)
    assert status == 503 and doc["error"]["code"] == "overloaded"
    assert int(headers["retry-after"]) >= 1
    assert 'batchserve_rejected_total{reason="queue_full"} 1.0' in h.metrics.render().decode()


def test_deadline_passed_is_504() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, timeout_s=0.5)
    d = h.treq.post(URL + "v1/embed", data=RED, headers={"Content-Type": "image/jpeg"})
    h.treq.flush()
    h.clock.advance(0.6)
    h.treq.flush()
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


def test_readyz_model_and_healthz_when_ready() -> None:
    h = Harness()
    assert h.request("GET", "/readyz")[0] == 200
    status, _, doc = h.request("GET", "/v1/model")
    assert status == 200
    assert doc["name"] == "fake" and doc["dim"] == 8 and doc["input_size"] == [32, 32]
    assert doc["classes"] == ["cat", "dog", "car"] and doc["pretrained"] is False


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
    assert "batchserve_decode_seconds_count" in text
    assert "batchserve_queue_items 0.0" in text


def test_client_hanging_up_removes_its_queued_items() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    h.treq.post(URL + "v1/embed", data=RED, headers={"Content-Type": "image/jpeg"})
    d = h.service.embed([RED, BLUE])
    assert h.batcher.queued == 2
    d.cancel()  # what Klein does to the handler's Deferred when the connection drops
    assert h.batcher.queued == 0
    runner.complete(lambda _img: _prediction())
    assert runner.sizes == [1]  # the dropped images never reached the model
