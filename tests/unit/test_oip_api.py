"""The /v2 routes (Open Inference Protocol) on the real server graph: health, metadata and
inference through the same batcher, deadlines, tokens and metrics as /v1."""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import orjson

from batchserve.http.auth import Tokens
from batchserve.models.images import DecodeLimits, decode_image
from batchserve.testing import FakeRunner, result_of
from tests.unit.test_api import BLUE, RED, Harness, embedding_of

INFER = "/v2/models/fake/infer"


def infer_json(images: list[bytes], **extra: Any) -> bytes:
    data = [base64.b64encode(i).decode() for i in images]
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)], "data": data}
    return orjson.dumps({"inputs": [tensor], **extra})


def infer_binary(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    tail = b"".join(struct.pack("<I", len(i)) + i for i in images)
    tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [len(images)]}
    tensor["parameters"] = {"binary_data_size": len(tail)}
    header = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return header + tail, {"Inference-Header-Content-Length": str(len(header))}


def test_health_and_metadata() -> None:
    h = Harness()
    assert h.request("GET", "/v2/health/live")[0] == 200
    assert h.request("GET", "/v2/health/ready")[0] == 200
    status, _, server = h.request("GET", "/v2")
    assert status == 200 and "binary_tensor_data" in server["extensions"]
    for path in ("/v2/models/fake", "/v2/models/fake/versions/1"):
        status, _, meta = h.request("GET", path)
        assert status == 200 and meta["name"] == "fake" and meta["versions"] == ["1"], path
    assert h.request("GET", "/v2/models/fake/ready")[2] == {"name": "fake", "ready": True}
    status, _, error = h.request("GET", "/v2/models/other")
    assert status == 404 and "serves 'fake'" in error["error"]
    assert h.request("GET", "/v2/models/fake/versions/2")[0] == 404


def test_not_ready_until_the_model_is_loaded() -> None:
    h = Harness(ready=False)
    assert h.request("GET", "/v2/health/live")[0] == 200
    assert h.request("GET", "/v2/health/ready")[0] == 503
    status, headers, error = h.request("POST", INFER, infer_json([RED]))
    assert status == 503 and "loading" in error["error"] and "retry-after" in headers


def test_a_full_queue_is_503_with_retry_after_through_v2_as_through_v1() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, max_queue=1)
    json_type = {"Content-Type": "application/json"}
    h.send("POST", INFER, infer_json([RED]), json_type)
    h.clock.advance(9.0)  # a batch that took 9 s
    runner.complete(lambda _job: _unit())
    h.send("POST", INFER, infer_json([RED]), json_type)  # in flight
    h.send("POST", INFER, infer_json([RED]), json_type)  # queued: the queue is full
    status, headers, error = h.request("POST", INFER, infer_json([RED]), json_type)
    assert status == 503 and "queue" in error["error"]
    # One batch in flight and one image queued, at 0.8 x 0.05 + 0.2 x 9 = 1.84 s a batch.
    assert headers["retry-after"] == "2" == str(h.batcher.retry_after_s())
    assert 'batchserve_rejected_total{reason="queue_full"} 1.0' in h.metrics.render().decode()
    assert h.post_image("/v1/embed", RED)[1]["retry-after"] == headers["retry-after"]


def test_json_inference_equals_v1_embed() -> None:
    h = Harness()
    status, headers, doc = h.request("POST", INFER, infer_json([RED, BLUE], id="q1"))
    assert status == 200 and headers["content-type"] == "application/json"
    assert doc["id"] == "q1" and doc["model_name"] == "fake"
    outputs = {o["name"]: o for o in doc["outputs"]}
    embeddings = np.array(outputs["EMBEDDING"]["data"]).reshape(outputs["EMBEDDING"]["shape"])
    np.testing.assert_allclose(embeddings[0], embedding_of(h, RED), atol=1e-6)
    v1 = h.post_image("/v1/embed", BLUE)[2]["results"][0]["embedding"]
    np.testing.assert_allclose(embeddings[1], v1, atol=1e-6)
    assert outputs["PROBABILITIES"]["shape"] == [2, 3]


def test_binary_inference_returns_binary_tensors() -> None:
    h = Harness()
    body, headers = infer_binary([RED])
    response = result_of(h.send("POST", INFER, body, headers))
    assert response.code == 200
    length = int(response.headers["inference-header-content-length"])
    doc = orjson.loads(response.body[:length])
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    embedding = np.frombuffer(response.body[length : length + size], dtype="<f4")
    np.testing.assert_allclose(embedding, embedding_of(h, RED), atol=1e-6)


def test_pixels_are_resized_as_a_decoded_image_is() -> None:
    h = Harness()
    pixels = decode_image(RED, (64, 48), DecodeLimits())[None]  # not the model's 32 x 32
    tensor = {"name": "PIXELS", "datatype": "UINT8", "shape": list(pixels.shape)}
    tensor["data"] = pixels.ravel().tolist()
    status, _, doc = h.request("POST", INFER, orjson.dumps({"inputs": [tensor]}))
    assert status == 200
    np.testing.assert_allclose(doc["outputs"][0]["data"], embedding_of(h, RED), atol=1e-3)


def test_v2_and_v1_requests_share_one_batch() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner)
    first = h.post("/v1/embed", RED)  # to the idle model alone
    v2 = h.send("POST", INFER, infer_json([RED, BLUE, RED]))
    v1 = h.post("/v1/embed", BLUE)
    h.flush()
    assert runner.sizes == [1] and h.batcher.queued == 4
    runner.complete(lambda _image: _unit())
    h.flush()
    assert runner.sizes == [1, 4]  # three images of the v2 request and one of /v1
    runner.complete(lambda _image: _unit())
    h.flush()
    assert [result_of(d).code for d in (first, v2, v1)] == [200, 200, 200]


def test_errors_use_the_protocols_shape_and_status() -> None:
    h = Harness()
    status, _, error = h.request("POST", INFER, b"not json")
    assert status == 400 and error["error"].startswith("invalid JSON")
    status, _, error = h.request("POST", INFER, infer_json([b"not an image"]))
    assert status == 400 and "cannot identify" in error["error"]
    status, _, error = h.request("POST", INFER, infer_json([RED] * 4))
    assert status == 413 and list(error) == ["error"]
    status, headers, error = h.request("GET", INFER)
    assert status == 405 and list(error) == ["error"] and headers["allow"] == "POST"


def test_a_deadline_in_the_request_parameters_is_honoured() -> None:
    runner: FakeRunner[Any] = FakeRunner()
    h = Harness(runner=runner, timeout_s=10.0)
    d = h.send("POST", INFER, infer_json([RED], parameters={"timeout": 1_500_000}))
    h.flush()
    h.clock.advance(1.6)
    h.flush()
    response = result_of(d)
    assert response.code == 504 and "deadline" in orjson.loads(response.body)["error"]


def test_tokens_and_metrics_apply_as_on_v1() -> None:
    h = Harness(tokens=Tokens(api="secret"))
    assert h.request("POST", INFER, infer_json([RED]))[0] == 401
    assert h.request("GET", "/v2/health/ready")[0] == 200  # health stays open
    ok = h.request("POST", INFER, infer_json([RED]), {"Authorization": "Bearer secret"})
    assert ok[0] == 200
    page = h.metrics.render().decode()
    assert 'route="/v2/models/{name}/infer"' in page


def _unit() -> Any:
    from batchserve.models.batches import Prediction

    return Prediction(np.ones(8, dtype=np.float32) / np.sqrt(8), np.ones(3, np.float32) / 3)


def test_a_shape_past_int64_or_string_pixels_are_400_not_500() -> None:
    h = Harness()
    for shape, data in [
        ([1, 2**62, 4, 3], []),  # numpy's product wraps to 0, the size of no data
        ([1, 2**63, 2, 3], []),  # past int64 before any product
        ([1, 1, 1, 3], ["0", "1", "2"]),  # was read as numbers
    ]:
        tensor = {"name": "PIXELS", "datatype": "UINT8", "shape": shape, "data": data}
        status, _, error = h.request("POST", INFER, orjson.dumps({"inputs": [tensor]}))
        assert status == 400 and list(error) == ["error"], (shape, error)


def test_an_unknown_key_of_an_inference_request_is_400_naming_it() -> None:
    h = Harness()
    body = orjson.loads(infer_json([RED]))
    body["inputs"][0]["dtype"] = "BYTES"
    status, _, error = h.request("POST", INFER, orjson.dumps(body))
    assert status == 400 and error["error"].startswith('unknown key "dtype" in an input')
