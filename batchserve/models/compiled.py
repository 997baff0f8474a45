"""The one compiled serving function of a model: uint8 pixels in, normalised inside the
graph, L2-normalised embeddings (and class probabilities) out, under a fixed input
signature so that it never retraces; and TensorFlow's threads and devices."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.errors import ModelLoadError
from batchserve.models.spec import ModelInfo, ModelOutputs, ModelSpec, embedding_recipe, read_labels

#: The environment that keeps TensorFlow's C++ info and warning lines (CPU features,
#: plugins) out of a process's output; read when TensorFlow is imported.
QUIET_TENSORFLOW = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def quiet_tensorflow(environ: MutableMapping[str, str]) -> None:
    """Set ``QUIET_TENSORFLOW`` in ``environ`` before TensorFlow is imported; a value
    already set is kept."""
    for name, value in QUIET_TENSORFLOW.items():
        environ.setdefault(name, value)


#: A native (absl / glog) log line, as TensorFlow's libraries write it to stderr whatever
#: TF_CPP_MIN_LOG_LEVEL says: level letter, date, time, thread, file:line] text.
NATIVE_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)")
#: The line absl writes before its first one when nothing has set up its logging.
ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"


def is_start_up_noise(line: str) -> bool:
    """absl's preamble, or one of its info lines (oneDNN's notice, once per library)."""
    found = NATIVE_LINE.fullmatch(line)
    return line.startswith(ABSL_PREAMBLE) or (found is not None and found.group(1) == "I")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up lines kept off stderr (``index`` and ``train``
    printed them twice); any other line it writes passes. Only in a process that asked for
    quiet (``quiet_tensorflow``): at ``--log-level debug`` they are shown as they come."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        return
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(read_end, chunks), daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        import tensorflow  # noqa: F401 (loaded here, where its lines are caught)
    finally:
        os.dup2(saved, 2)  # the pipe's last writer gone: the reader reaches its end
        os.close(saved)
        reader.join(timeout=5.0)
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        if line.strip() and not is_start_up_noise(line):
            print(line, file=sys.stderr)


def _read_all(fd: int, chunks: list[bytes]) -> None:
    with os.fdopen(fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)


def configure_tensorflow(spec: ModelSpec) -> str:
    """Set TensorFlow's thread counts and devices; return the device the model will use.

    Must run before TensorFlow executes anything. GPU memory growth is turned on so that
    FAISS can share the card.
    """
    import_tensorflow_quietly()
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


class InputHead:
    """A classifier computed from the preprocessed input rather than from the features."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn


def weights_digest(variables: Any) -> str:
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


def compile_model(
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
    trained_on: str,
) -> TensorFlowModel:
    import tensorflow as tf

    if spec.labels_file:
        try:
            classes = read_labels(Path(spec.labels_file).read_text(encoding="utf-8"))
        except OSError as e:
            raise ModelLoadError(f"cannot read labels file {spec.labels_file}: {e}") from e
    height, width = int(input_shape[0]), int(input_shape[1])
    mode = preprocess if spec.preprocess == "auto" else spec.preprocess
    traced: dict[str, bool] = {}
    compiled = tf.function(
        serving_function(preprocess_fn(mode), features, head, spec, traced),
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8)],
        jit_compile=spec.jit_compile and device == "gpu",
        autograph=False,
    )
    concrete = compiled.get_concrete_function()
    dim, classes = _outputs(concrete.structured_outputs, classes)
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
        trained_on=trained_on,
        embedding=embedding_recipe(spec, traced.get("pools_map", False)),
    )
    return TensorFlowModel(info, concrete)


def serving_function(
    normalise: Callable[[Any], Any],
    features: Any,
    head: Any,
    spec: ModelSpec,
    traced: dict[str, bool],
) -> Callable[[Any], dict[str, Any]]:
    """uint8 images -> {"embedding": unit rows, "probabilities": softmax rows (with a head)}:
    the graph that ``compile_model`` traces once. A feature map is pooled as ``spec`` says
    into the embedding (``traced["pools_map"]`` records that it was a map), and averaged for
    the head, as the head was trained."""
    import tensorflow as tf

    def serve(images: Any) -> dict[str, Any]:
        x = normalise(tf.cast(images, tf.float32))
        feats = features(x, training=False) if hasattr(features, "layers") else features(x)
        embedding = feats
        if len(feats.shape) == 4:
            traced["pools_map"] = True
            embedding = pool_map(tf.cast(feats, tf.float32), spec)
            feats = tf.reduce_mean(feats, axis=[1, 2])
        out = {"embedding": l2_normalise(tf.cast(embedding, tf.float32))}
        if isinstance(head, InputHead):
            out["probabilities"] = tf.cast(head.fn(feats, x), tf.float32)
        elif head is not None:
            logits = head(feats, training=False)
            activation = getattr(head, "activation", None)
            if getattr(activation, "__name__", "") != "softmax":
                logits = tf.nn.softmax(logits)
            out["probabilities"] = tf.cast(logits, tf.float32)
        return out

    return serve


def pool_map(feature_map: Any, spec: ModelSpec) -> Any:
    """[N, h, w, c] -> [N, c]: generalized mean (GeM, ``spec.gem_p``; values clamped at a
    small positive floor) or the plain average. GeM weighs the strongest responses more, so
    a border, a crop or a banner moves the embedding less (bench/RESULTS.md, search
    quality)."""
    import tensorflow as tf

    if p := spec.gem_exponent():
        powered = tf.pow(tf.maximum(feature_map, 1e-6), p)
        return tf.pow(tf.reduce_mean(powered, axis=[1, 2]), 1.0 / p)
    return tf.reduce_mean(feature_map, axis=[1, 2])


def _outputs(outputs: dict[str, Any], classes: list[str] | None) -> tuple[int, list[str] | None]:
    """The embedding's dim, and the class labels checked against the head's width."""
    dim = int(outputs["embedding"].shape[-1])
    n_classes = int(outputs["probabilities"].shape[-1]) if "probabilities" in outputs else 0
    if classes is not None and n_classes and len(classes) != n_classes:
        raise ModelLoadError(f"{len(classes)} labels given for a head of {n_classes} classes")
    if classes is None and n_classes:
        classes = [str(i) for i in range(n_classes)]
    return dim, classes


class TensorFlowModel:
    """A loaded model: one concrete function with a fixed uint8 input signature."""

    def __init__(self, info: ModelInfo, concrete: Any) -> None:
        self._info = info
        self._concrete = concrete

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def concrete(self) -> Any:
        """The traced serving function (what another runtime converts)."""
        return self._concrete

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
