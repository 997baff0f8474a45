"""The Open Inference Protocol v2 wire format (http/v2_wire.py): JSON and binary tensors in,
JSON and binary tensors out, and the errors a bad request gets."""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.http.bodies import RequestLimits
from batchserve.http.v2_wire import InferRequest, model_metadata, read_infer, write_infer
from batchserve.models.batches import Prediction
from batchserve.testing import FakeModel

INFO = FakeModel(classes=["cat", "dog"]).info
PLAIN = FakeModel(classes=None).info
LIMITS = RequestLimits(max_images=3)


def binary_request(doc: dict[str, Any], tail: bytes) -> tuple[bytes, int]:
    header = orjson.dumps(doc)
    return header + tail, len(header)


def packed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def image_input(n: int, **extra: Any) -> dict[str, Any]:
    return {"name": "IMAGE", "datatype": "BYTES", "shape": [n], **extra}


def test_images_as_json_base64_strings() -> None:
    data = [base64.b64encode(b"one").decode(), base64.b64encode(b"two").decode()]
    doc = {"id": "r1", "inputs": [image_input(2, data=data)]}
    request = read_infer(orjson.dumps(doc), None, INFO, LIMITS)
    assert request.images == [b"one", b"two"] and request.id == "r1"
    assert request.outputs == {"EMBEDDING": False, "PROBABILITIES": False}


def test_images_as_binary_elements_after_the_header() -> None:
    tail = packed(b"\xff\xd8first", b"second")
    doc = {"inputs": [image_input(2, parameters={"binary_data_size": len(tail)})]}
    body, length = binary_request({**doc, "parameters": {"binary_data_output": True}}, tail)
    request = read_infer(body, length, INFO, LIMITS)
    assert request.images == [b"\xff\xd8first", b"second"]
    assert request.outputs == {"EMBEDDING": True, "PROBABILITIES": True}


def test_pixels_as_json_numbers_or_binary_bytes() -> None:
    pixels = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)
    shape = [1, 2, 2, 3]
    doc = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": shape}]}
    doc["inputs"][0]["data"] = pixels.ravel().tolist()
    [as_json] = read_infer(orjson.dumps(doc), None, INFO, LIMITS).images
    np.testing.assert_array_equal(as_json, pixels[0])
    raw = pixels.tobytes()
    doc["inputs"][0] = {**doc["inputs"][0], "parameters": {"binary_data_size": len(raw)}}
    del doc["inputs"][0]["data"]
    [as_binary] = read_infer(*binary_request(doc, raw), INFO, LIMITS).images
    np.testing.assert_array_equal(as_binary, pixels[0])


def test_outputs_are_chosen_and_each_says_how_it_is_sent() -> None:
    doc = {
        "inputs": [image_input(1, data=[base64.b64encode(b"x").decode()])],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": True}}],
        "parameters": {"timeout": 2_500_000},
    }
    request = read_infer(orjson.dumps(doc), None, INFO, LIMITS)
    assert request.outputs == {"PROBABILITIES": True} and request.timeout_s == 2.5


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"inputs": []}, "send one input"),
        ({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1]}]}, "unknown input"),
        ({"inputs": [image_input(2, data=["eA=="])]}, "shape [2] but 1 elements"),
        ({"inputs": [image_input(1, data=["not base64!"])]}, "not base64"),
        ({"inputs": [image_input(1, data=["eA=="])], "outputs": [{"name": "X"}]}, "unknown output"),
        (
            {
                "inputs": [
                    {
                        "name": "PIXELS",
                        "datatype": "UINT8",
                        "shape": [1, 1, 1, 3],
                        "data": [0, 256, 1],
                    }
                ]
            },
            "0-255",
        ),
        ({"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2]}]}, "[N, H, W, 3]"),
        ({"inputs": [image_input(1, data=["eA=="])], "parameters": {"timeout": -1}}, "timeout"),
    ],
)
def test_a_bad_request_says_what_is_wrong(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)


def test_probabilities_of_a_model_without_a_classifier_are_refused() -> None:
    doc = {"inputs": [image_input(1, data=["eA=="])], "outputs": [{"name": "PROBABILITIES"}]}
    with pytest.raises(InvalidInput, match="unknown output"):
        read_infer(orjson.dumps(doc), None, PLAIN, LIMITS)
    request = read_infer(orjson.dumps({"inputs": doc["inputs"]}), None, PLAIN, LIMITS)
    assert request.outputs == {"EMBEDDING": False}


def test_more_images_than_a_request_may_hold_is_413() -> None:
    doc = {"inputs": [image_input(4, data=["eA=="] * 4)]}
    with pytest.raises(PayloadTooLarge):
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)


def test_binary_sizes_that_do_not_add_up_are_refused() -> None:
    tail = packed(b"abc")
    doc = {"inputs": [image_input(1, parameters={"binary_data_size": len(tail) + 1})]}
    with pytest.raises(InvalidInput, match="binary_data_size"):
        read_infer(*binary_request(doc, tail), INFO, LIMITS)
    doc = {"inputs": [image_input(1, parameters={"binary_data_size": 6})]}
    with pytest.raises(InvalidInput, match="runs past"):
        read_infer(*binary_request(doc, struct.pack("<I", 9) + b"ab"), INFO, LIMITS)
    with pytest.raises(InvalidInput, match="does not fit"):
        read_infer(b"{}", 99, INFO, LIMITS)


def predictions() -> list[Prediction]:
    return [
        Prediction(np.array([0.6, 0.8], np.float32), np.array([0.9, 0.1], np.float32)),
        Prediction(np.array([1.0, 0.0], np.float32), np.array([0.2, 0.8], np.float32)),
    ]


def test_json_outputs_are_flat_row_major_data() -> None:
    asked = InferRequest([b"a", b"b"], {"EMBEDDING": False}, id="r7")
    body, length = write_infer(INFO, asked, predictions())
    assert length is None
    doc = orjson.loads(body)
    assert doc["model_name"] == INFO.name and doc["model_version"] == "1" and doc["id"] == "r7"
    [out] = doc["outputs"]
    assert out["name"] == "EMBEDDING" and out["datatype"] == "FP32" and out["shape"] == [2, 2]
    np.testing.assert_allclose(out["data"], [0.6, 0.8, 1.0, 0.0], rtol=1e-6)


def test_binary_outputs_follow_the_header_in_order() -> None:
    asked = InferRequest([b"a", b"b"], {"EMBEDDING": True, "PROBABILITIES": True})
    body, length = write_infer(INFO, asked, predictions())
    assert length is not None
    doc = orjson.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    assert sizes == [16, 16] and len(body) == length + 32
    probabilities = np.frombuffer(body[length + 16 :], dtype="<f4").reshape(2, 2)
    np.testing.assert_allclose(probabilities, [[0.9, 0.1], [0.2, 0.8]])


def test_model_metadata_names_the_tensors_and_the_classes() -> None:
    meta = model_metadata(INFO)
    assert [i["name"] for i in meta["inputs"]] == ["IMAGE", "PIXELS"]
    assert meta["inputs"][1]["shape"] == [-1, *INFO.input_size, 3]
    assert meta["outputs"][1] == {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 2]}
    assert meta["parameters"]["classes"] == ["cat", "dog"]
    assert [o["name"] for o in model_metadata(PLAIN)["outputs"]] == ["EMBEDDING"]


def pixels_input(shape: list[Any], data: Any = None) -> dict[str, Any]:
    tensor = {"name": "PIXELS", "datatype": "UINT8", "shape": shape}
    return tensor if data is None else {**tensor, "data": data}


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        (
            {"inputs": [image_input(1, data=["eA=="])], "output": [{"name": "EMBEDDING"}]},
            'unknown key "output" in the inference request; valid: id, inputs, outputs, parameters',
        ),
        (
            {"inputs": [image_input(1, data=["eA=="], parameter={"binary_data_size": 1})]},
            'unknown key "parameter" in an input; valid: data, datatype, name, parameters, shape',
        ),
        (
            {
                "inputs": [image_input(1, data=["eA=="])],
                "outputs": [{"name": "EMBEDDING", "binary_data": True}],
            },
            'unknown key "binary_data" in an output; valid: name, parameters',
        ),
    ],
)
def test_a_key_the_protocol_does_not_define_is_refused_naming_it(
    doc: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)
    assert str(refused.value) == says


def test_every_field_the_official_triton_client_sends_is_accepted() -> None:
    triton = pytest.importorskip("tritonclient.http")
    pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    tensor = triton.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    output = triton.InferRequestedOutput("EMBEDDING", binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body(
        [tensor],
        [output],
        request_id="r1",
        sequence_id=3,
        sequence_start=True,
        sequence_end=True,
        priority=2,
        timeout=5_000_000,
        parameters={"tenant": "a"},
    )
    request = read_infer(body, length, INFO, LIMITS)
    np.testing.assert_array_equal(request.images[0], pixels[0])
    assert request.id == "r1" and request.timeout_s == 5.0
    assert request.outputs == {"EMBEDDING": True}
    images = triton.InferInput("IMAGE", [2], "BYTES")
    images.set_data_from_numpy(np.array([b"one", b"two"], dtype=object), binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([images])
    assert read_infer(body, length, INFO, LIMITS).images == [b"one", b"two"]


@pytest.mark.parametrize(
    "shape",
    [
        [1, 2**32, 2**32, 3],  # 2**64 * 3 elements: past int64, where numpy's product wraps
        [1, 2**62, 4, 3],  # wraps to 0
        [1, 2**63, 2, 3],  # past int64 before any product
        [1, 2**62, 2**62, 3],
        [1, 2**63 - 1, 2**63 - 1, 3],
        [1, 1_000_000, 1_000_000, 3],
        [1] * 100_000 + [2] * 100_000,  # a product of a hundred thousand dimensions
    ],
)
def test_a_shape_of_more_elements_than_a_body_may_hold_is_invalid(shape: list[int]) -> None:
    doc = {"inputs": [pixels_input(shape, [0, 0, 0])]}
    with pytest.raises(InvalidInput, match="elements, the most a request may carry"):
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)


@pytest.mark.parametrize("shape", [[1, -2, -2, 3], [1, True, 1, 3], [1, 1.0, 1, 3], "1,1,1,3"])
def test_a_shape_of_anything_but_non_negative_integers_is_invalid(shape: Any) -> None:
    doc = {"inputs": [pixels_input(shape, [0, 0, 0])]}
    with pytest.raises(InvalidInput, match="shape must be a list of non-negative integers"):
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        ["0", "1", "2"],  # numbers as strings
        [0, 1, "2"],
        [0.0, 1.0, 2.0],  # floats, even whole ones
        [True, False, True],
        [0, 1, True],
        [0, 1, None],
        [0, 1, {"v": 2}],
        "AAEC",
        {"0": 0},
    ],
)
def test_uint8_data_must_be_json_integers(data: Any) -> None:
    doc = {"inputs": [pixels_input([1, 1, 1, 3], data)]}
    with pytest.raises(InvalidInput, match="data must be a list of integers 0-255"):
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)


def test_uint8_data_may_be_nested_row_major_but_evenly() -> None:
    nested = [[[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]]
    doc = {"inputs": [pixels_input([1, 2, 2, 3], nested)]}
    [pixels] = read_infer(orjson.dumps(doc), None, INFO, LIMITS).images
    np.testing.assert_array_equal(pixels, np.arange(12).reshape(2, 2, 3))
    doc = {"inputs": [pixels_input([1, 1, 1, 3], [[0, 1], 2])]}
    with pytest.raises(InvalidInput, match="data nests its lists unevenly"):
        read_infer(orjson.dumps(doc), None, INFO, LIMITS)
