"""The official Triton client (tritonclient.http) against the live server, as a user would
write it: health, metadata, inference with binary and with JSON tensors, several images a
request, a bad input; the embeddings equal /v1/embed's for the same images."""

from __future__ import annotations

import base64
import importlib.resources
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Server

NAMES = ("cat", "coffee", "rocket")


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Any]:
    running = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield running
    running.close()


@pytest.fixture(scope="module")
def model(server: Server) -> str:
    return str(server.request("GET", "/v1/model").json()["name"])


def photos() -> list[bytes]:
    folder = importlib.resources.files("batchserve").joinpath("data/demo")
    return [folder.joinpath(f"{name}.jpg").read_bytes() for name in NAMES]


def v1_embeddings(server: Server) -> np.ndarray:
    rows = []
    for photo in photos():
        done = server.request("POST", "/v1/embed", photo, {"Content-Type": "image/jpeg"})
        rows.append(done.json()["results"][0]["embedding"])
    return np.array(rows, dtype=np.float32)


def test_health_and_metadata(client: Any, model: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(model)
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert {i["name"] for i in meta["inputs"]} == {"IMAGE", "PIXELS"}
    embedding, probabilities = meta["outputs"]
    assert embedding["shape"] == [-1, 1280] and probabilities["shape"] == [-1, 19]
    assert "Chihuahua" in meta["parameters"]["classes"]
    assert not client.is_model_ready("no-such-model")


def test_binary_inference_of_several_images_equals_v1_embed(
    client: Any, model: str, server: Server
) -> None:
    images = triton.InferInput("IMAGE", [len(NAMES)], "BYTES")
    images.set_data_from_numpy(np.array(photos(), dtype=np.object_))  # binary by default
    result = client.infer(model, [images])
    embeddings = result.as_numpy("EMBEDDING")
    assert embeddings.shape == (3, 1280) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, v1_embeddings(server), atol=1e-6)
    assert result.as_numpy("PROBABILITIES").shape == (3, 19)


def test_json_inference_with_one_output_chosen(client: Any, model: str, server: Server) -> None:
    encoded = [base64.b64encode(photo) for photo in photos()]
    images = triton.InferInput("IMAGE", [len(encoded)], "BYTES")
    images.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    wanted = [triton.InferRequestedOutput("EMBEDDING", binary_data=False)]
    result = client.infer(model, [images], outputs=wanted, request_id="json-1")
    assert result.get_response()["id"] == "json-1"
    assert result.as_numpy("PROBABILITIES") is None
    np.testing.assert_allclose(result.as_numpy("EMBEDDING"), v1_embeddings(server), atol=1e-6)


def test_pixels_already_decoded(client: Any, model: str) -> None:
    pixels = np.zeros((1, 160, 160, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    tensor = triton.InferInput("PIXELS", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    embedding = client.infer(model, [tensor]).as_numpy("EMBEDDING")
    assert embedding.shape == (1, 1280)
    assert abs(float(np.linalg.norm(embedding)) - 1.0) < 1e-4


def test_a_bad_input_is_a_clear_400(client: Any, model: str, server: Server) -> None:
    bad = triton.InferInput("IMAGE", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, [bad])
    assert raised.value.status() == "400" and "cannot identify" in raised.value.message()
    assert server.request("GET", "/readyz").status == 200  # and the server goes on
