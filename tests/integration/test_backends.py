"""The built-in model on OpenVINO against TensorFlow: the same embeddings and probabilities
on the demo photos; the converted copy kept in the cache, and a later start that loads it
without importing TensorFlow; a data dir TensorFlow made, served on OpenVINO, whose core
routes (embed, classify, search, add, v2 infer) answer as they did on TensorFlow."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from batchserve.models.images import DecodeLimits, decode_image
from batchserve.models.loaders import load_model
from batchserve.models.spec import EmbeddingModel, ModelSpec
from tests.integration.conftest import Server, start_server, stop_server

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install -e '.[openvino]'")

NAMES = ("cat", "coffee", "rocket", "brick", "astronaut")
JPEG = {"Content-Type": "image/jpeg"}


def photo(name: str) -> bytes:
    return importlib.resources.files("batchserve").joinpath(f"data/demo/{name}.jpg").read_bytes()


def demo_batch(size: tuple[int, int]) -> np.ndarray:
    return np.stack([decode_image(photo(n), size, DecodeLimits()) for n in NAMES])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def models(cache: Path) -> tuple[EmbeddingModel, EmbeddingModel]:
    """The built-in model on TensorFlow, and on OpenVINO converted into ``cache``."""
    return load_model(ModelSpec()), load_model(
        ModelSpec(backend="openvino", model_cache=str(cache))
    )


def test_openvino_embeds_and_classifies_the_demo_photos_as_tensorflow_does(
    models: tuple[EmbeddingModel, EmbeddingModel],
) -> None:
    on_tf, on_ov = models
    batch = demo_batch(on_tf.info.input_size)
    a, b = on_tf.predict(batch), on_ov.predict(batch)
    assert b.embeddings.shape == a.embeddings.shape and b.embeddings.dtype == np.float32
    assert (a.embeddings * b.embeddings).sum(axis=1).min() >= 0.9999
    assert a.probabilities is not None and b.probabilities is not None
    np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-4)
    # Any batch size: one image alone gets what it got in the batch.
    np.testing.assert_allclose(on_ov.predict(batch[:1]).embeddings, b.embeddings[:1], atol=1e-5)
    assert (on_tf.info.backend, on_ov.info.backend) == ("tensorflow", "openvino")
    assert on_ov.info.fingerprint() == on_tf.info.fingerprint()  # one index serves both


def test_a_later_start_loads_the_cached_copy_without_tensorflow(
    models: tuple[EmbeddingModel, EmbeddingModel], cache: Path
) -> None:
    script = (
        "import json, sys\n"
        "from batchserve.models.loaders import load_model\n"
        "from batchserve.models.spec import ModelSpec\n"
        "m = load_model(ModelSpec(backend='openvino', model_cache=sys.argv[1]))\n"
        "print(json.dumps([m.info.backend, m.info.dim, 'tensorflow' in sys.modules, "
        "'keras' in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(cache)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["openvino", 1280, False, False]


def embed(server: Server, name: str) -> np.ndarray:
    done = server.request("POST", "/v1/embed", photo(name), JPEG)
    assert done.status == 200, done.body
    return np.array(done.json()["results"][0]["embedding"], dtype=np.float32)


def classify(server: Server, name: str) -> list[str]:
    done = server.request("POST", "/v1/classify?k=3", photo(name), JPEG)
    assert done.status == 200, done.body
    return [c["label"] for c in done.json()["results"][0]["labels"]]


def v2_embeddings(server: Server) -> np.ndarray:
    """The cat's embedding through the Open Inference Protocol, from its official client."""
    model = str(server.request("GET", "/v1/model").json()["name"])
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.get_model_metadata(model)["platform"] == "batchserve_openvino"
        images = triton.InferInput("IMAGE", [1], "BYTES")
        images.set_data_from_numpy(np.array([photo("cat")], dtype=np.object_))
        return np.asarray(client.infer(model, [images]).as_numpy("EMBEDDING"))[0]
    finally:
        client.close()


def test_a_data_dir_made_on_tensorflow_is_served_on_openvino(
    tmp_path: Path, cache: Path, models: tuple[EmbeddingModel, EmbeddingModel]
) -> None:
    on_tf = start_server(tmp_path, "--max-delay-s", "0.005")
    try:
        assert on_tf.request("POST", "/v1/items?id=mine", photo("coffee"), JPEG).status == 200
        before = {name: embed(on_tf, name) for name in NAMES}
        classes = classify(on_tf, "cat")
    finally:
        assert stop_server(on_tf) == 0
    on_ov = start_server(
        tmp_path, "--backend", "openvino", "--model-cache", str(cache), "--max-delay-s", "0.005"
    )
    try:
        assert on_ov.request("GET", "/v1/model").json()["backend"] == "openvino"
        for name in NAMES:
            assert float(embed(on_ov, name) @ before[name]) >= 0.9999
        assert classify(on_ov, "cat") == classes
        found = on_ov.request("POST", "/v1/search?k=1", photo("coffee"), JPEG).json()
        best = found["results"][0]["matches"][0]
        assert best["id"] in {"mine", "sample/coffee"} and best["score"] >= 0.9999
        assert on_ov.request("POST", "/v1/items?id=added", photo("rocket"), JPEG).status == 200
        assert on_ov.request("GET", "/v1/items/added").status == 200
        assert v2_embeddings(on_ov) @ before["cat"] >= 0.9999
    finally:
        assert stop_server(on_ov) == 0
