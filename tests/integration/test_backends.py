"""The built-in model on every backend against TensorFlow: the same embeddings and
probabilities on the demo photos. OpenVINO's converted copy is kept in the cache and a later
start loads it without importing TensorFlow; JAX and PyTorch run in processes where
TensorFlow cannot be imported. A data dir TensorFlow made is served on each of them, and its
core routes (embed, classify, search, add, v2 infer) answer as they did on TensorFlow."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from batchserve.models.images import DecodeLimits, decode_image
from batchserve.models.loaders import load_model
from batchserve.models.spec import EmbeddingModel, ModelSpec
from tests.integration.conftest import Server, start_server, stop_server

NAMES = ("cat", "coffee", "rocket", "brick", "astronaut")
JPEG = {"Content-Type": "image/jpeg"}
#: What each backend needs, and how to install it where it is missing.
NEEDS = {
    "openvino": ("openvino", "OpenVINO is not installed: pip install -e '.[openvino]'"),
    "jax": ("jax", "JAX is not installed: pip install -e '.[jax]'"),
    "torch": (
        "torch",
        "PyTorch is not installed: pip install -e '.[torch]' (its CPU build first: "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu)",
    ),
}
#: A PYTHONPATH on which TensorFlow cannot be imported (its sitecustomize hides it).
WITHOUT_TENSORFLOW = str(Path(__file__).parent / "without_tensorflow")


def needs(backend: str) -> None:
    module, reason = NEEDS[backend]
    pytest.importorskip(module, reason=reason)


def photo(name: str) -> bytes:
    return importlib.resources.files("batchserve").joinpath(f"data/demo/{name}.jpg").read_bytes()


def demo_batch(size: tuple[int, int]) -> np.ndarray:
    return np.stack([decode_image(photo(n), size, DecodeLimits()) for n in NAMES])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def on_tf() -> EmbeddingModel:
    """The built-in model on TensorFlow, in this process."""
    return load_model(ModelSpec(backend="tensorflow"))


@pytest.fixture(scope="module")
def on_ov(cache: Path) -> EmbeddingModel:
    """The built-in model on OpenVINO, converted into ``cache``."""
    needs("openvino")
    return load_model(ModelSpec(backend="openvino", model_cache=str(cache)))


def test_openvino_embeds_and_classifies_the_demo_photos_as_tensorflow_does(
    on_tf: EmbeddingModel, on_ov: EmbeddingModel
) -> None:
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
    on_ov: EmbeddingModel, cache: Path
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


#: Loads the built-in model on a Keras backend, in a process of its own (Keras has one
#: backend per process), and writes what it makes of a batch of images.
PREDICT_ON = """
import json, sys
import numpy as np
from batchserve.models.loaders import load_model
from batchserve.models.spec import ModelSpec
model = load_model(ModelSpec(backend=sys.argv[1]))
batch = np.load(sys.argv[2])
out = model.predict(batch)
np.savez(sys.argv[3], embeddings=out.embeddings, probabilities=out.probabilities,
         first=model.predict(batch[:1]).embeddings)
print(json.dumps({"backend": model.info.backend, "fingerprint": model.info.fingerprint(),
                  "tensorflow": sys.modules.get("tensorflow") is not None}))
"""


def without_tensorflow() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [WITHOUT_TENSORFLOW, os.environ.get("PYTHONPATH")])
        ),
    )


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_jax_and_pytorch_embed_and_classify_as_tensorflow_does_without_it(
    backend: str, on_tf: EmbeddingModel, tmp_path: Path
) -> None:
    needs(backend)
    batch = demo_batch(on_tf.info.input_size)
    np.save(tmp_path / "batch.npy", batch)
    done = subprocess.run(
        [sys.executable, "-c", PREDICT_ON, backend, str(tmp_path / "batch.npy"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300, env=without_tensorflow(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.splitlines()[-1])
    assert said["backend"] == backend and said["tensorflow"] is False
    # One index serves every backend: the same fingerprint, JSON as the catalog keeps it.
    assert said["fingerprint"] == json.loads(json.dumps(on_tf.info.fingerprint()))
    out, a = np.load(tmp_path / "out.npz"), on_tf.predict(batch)
    assert out["embeddings"].dtype == np.float32
    assert (a.embeddings * out["embeddings"]).sum(axis=1).min() >= 0.9999
    np.testing.assert_allclose(out["probabilities"], a.probabilities, atol=1e-4)
    np.testing.assert_allclose(out["first"], out["embeddings"][:1], atol=1e-5)


def test_a_savedmodel_on_jax_is_refused_with_the_backends_that_run_it(tmp_path: Path) -> None:
    needs("jax")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"")
    script = (
        "import sys\n"
        "from batchserve.models.loaders import load_model\n"
        "from batchserve.models.spec import ModelSpec\n"
        "load_model(ModelSpec(backend='jax', source=sys.argv[1]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "saved")],
        capture_output=True, text=True, timeout=120, env=without_tensorflow(),
    )  # fmt: skip
    assert done.returncode != 0
    assert "is a TensorFlow SavedModel, which --backend jax cannot run" in done.stderr
    assert "--backend tensorflow" in done.stderr


def embed(server: Server, name: str) -> np.ndarray:
    done = server.request("POST", "/v1/embed", photo(name), JPEG)
    assert done.status == 200, done.body
    return np.array(done.json()["results"][0]["embedding"], dtype=np.float32)


def classify(server: Server, name: str) -> list[str]:
    done = server.request("POST", "/v1/classify?k=3", photo(name), JPEG)
    assert done.status == 200, done.body
    return [c["label"] for c in done.json()["results"][0]["labels"]]


def v2_embeddings(server: Server, backend: str) -> np.ndarray:
    """The cat's embedding through the Open Inference Protocol, from its official client."""
    model = str(server.request("GET", "/v1/model").json()["name"])
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.get_model_metadata(model)["platform"] == f"batchserve_{backend}"
        images = triton.InferInput("IMAGE", [1], "BYTES")
        images.set_data_from_numpy(np.array([photo("cat")], dtype=np.object_))
        return np.asarray(client.infer(model, [images]).as_numpy("EMBEDDING"))[0]
    finally:
        client.close()


@dataclass(frozen=True)
class MadeOnTensorFlow:
    """A data dir a TensorFlow server made (one item added), and what that server said."""

    data: Path
    embeddings: dict[str, np.ndarray]
    classes: list[str]


@pytest.fixture(scope="module")
def made_on_tf(tmp_path_factory: pytest.TempPathFactory) -> MadeOnTensorFlow:
    directory = tmp_path_factory.mktemp("made-on-tensorflow")
    server = start_server(directory, "--backend", "tensorflow", "--max-delay-s", "0.005")
    try:
        assert server.request("GET", "/v1/model").json()["backend"] == "tensorflow"
        assert server.request("POST", "/v1/items?id=mine", photo("coffee"), JPEG).status == 200
        before = {name: embed(server, name) for name in NAMES}
        classes = classify(server, "cat")
    finally:
        assert stop_server(server) == 0
    return MadeOnTensorFlow(directory, before, classes)


@pytest.mark.parametrize("backend", ["openvino", "jax", "torch"])
def test_a_data_dir_made_on_tensorflow_is_served_on_another_backend(
    backend: str, tmp_path: Path, cache: Path, made_on_tf: MadeOnTensorFlow
) -> None:
    needs(backend)
    shutil.copytree(made_on_tf.data, tmp_path, dirs_exist_ok=True)
    flags = ["--backend", backend, "--max-delay-s", "0.005", "--max-batch-size", "8"]
    if backend == "openvino":
        server = start_server(tmp_path, *flags, "--model-cache", str(cache))
    else:
        server = start_server(
            tmp_path, *flags, env={"PYTHONPATH": without_tensorflow()["PYTHONPATH"]}
        )
    try:
        assert server.request("GET", "/v1/model").json()["backend"] == backend
        for name in NAMES:
            assert float(embed(server, name) @ made_on_tf.embeddings[name]) >= 0.9999
        assert classify(server, "cat") == made_on_tf.classes
        found = server.request("POST", "/v1/search?k=1", photo("coffee"), JPEG).json()
        best = found["results"][0]["matches"][0]
        assert best["id"] in {"mine", "sample/coffee"} and best["score"] >= 0.9999
        assert server.request("POST", "/v1/items?id=added", photo("rocket"), JPEG).status == 200
        assert server.request("GET", "/v1/items/added").status == 200
        assert v2_embeddings(server, backend) @ made_on_tf.embeddings["cat"] >= 0.9999
    finally:
        assert stop_server(server) == 0
