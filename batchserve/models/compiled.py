"""The one compiled serving function of a model (graph.py: uint8 pixels in, normalised
inside the graph, L2-normalised embeddings and class probabilities out), compiled for its
backend: on TensorFlow under a fixed input signature so that it never retraces, on JAX and
PyTorch by keras_backends.py; and TensorFlow's threads, devices and start-up lines."""

from __future__ import annotations

import functools
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
from batchserve.models import keras_backends
from batchserve.models.graph import preprocess_fn, serving_function
from batchserve.models.spec import (
    KERAS_BACKENDS,
    EmbeddingModel,
    ModelInfo,
    ModelOutputs,
    ModelSpec,
    embedding_recipe,
    read_labels,
)

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
    keras_backends.use_keras_backend("tensorflow")
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


def weights_digest(variables: Any) -> str:
    digest = hashlib.sha256()
    for variable in variables:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


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
) -> EmbeddingModel:
    """The serving function (graph.py) around ``features`` and ``head``, compiled for
    ``spec.backend``: TensorFlow's (also what OpenVINO converts), or JAX's or PyTorch's."""
    if spec.labels_file:
        try:
            classes = read_labels(Path(spec.labels_file).read_text(encoding="utf-8"))
        except OSError as e:
            raise ModelLoadError(f"cannot read labels file {spec.labels_file}: {e}") from e
    size = int(input_shape[0]), int(input_shape[1])
    mode = preprocess if spec.preprocess == "auto" else spec.preprocess
    traced: dict[str, bool] = {}
    serve = serving_function(preprocess_fn(mode), features, head, spec, traced)
    make: Callable[[ModelInfo], EmbeddingModel]
    if spec.backend in KERAS_BACKENDS:
        run, outputs = keras_backends.compile_serving(serve, spec, device, size)
        make = functools.partial(keras_backends.KerasModel, run=run)
    else:
        concrete = _trace_tensorflow(serve, spec, device, size)
        outputs = concrete.structured_outputs
        make = functools.partial(TensorFlowModel, concrete=concrete)
    dim, classes = _outputs(outputs, classes)
    return make(
        ModelInfo(
            name=name,
            source=source,
            input_size=size,
            dim=dim,
            classes=classes,
            pretrained=pretrained,
            weights_sha256=digest,
            preprocess=mode,
            device=device,
            trained_on=trained_on,
            backend=spec.backend if spec.backend in KERAS_BACKENDS else "tensorflow",
            embedding=embedding_recipe(spec, traced.get("pools_map", False)),
        )
    )


def _trace_tensorflow(
    serve: Callable[[Any], dict[str, Any]], spec: ModelSpec, device: str, size: tuple[int, int]
) -> Any:
    """``serve`` traced once by TensorFlow for uint8 batches of any size."""
    import tensorflow as tf

    compiled = tf.function(
        serve,
        input_signature=[tf.TensorSpec([None, *size, 3], tf.uint8)],
        jit_compile=spec.jit_compile and device == "gpu",
        autograph=False,
    )
    return compiled.get_concrete_function()


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
        return ModelOutputs.copied(
            out["embedding"].numpy(), None if probabilities is None else probabilities.numpy()
        )
