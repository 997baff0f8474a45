"""The JAX and PyTorch backends (``--backend jax|torch``): the model read by Keras 3 on that
backend, and the serving function (graph.py) compiled its way: ``jax.jit`` for JAX (one
program per batch size, made at warm-up); PyTorch eagerly under ``no_grad``, which takes
any batch size, or ``torch.compile`` with ``--jit-compile``. On the GPU when the backend
sees one. Neither imports TensorFlow (Keras itself does, to read a legacy ``.h5`` file, only
where TensorFlow is installed).

Keras picks its backend once per process, when it is first imported: ``use_keras_backend``
sets it before that, and refuses a process whose Keras already runs on another."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.errors import ModelLoadError
from batchserve.models.spec import KERAS_BACKENDS, ModelInfo, ModelOutputs, ModelSpec

#: What each backend is called in messages (its extra has the backend's own name).
_NAMES = {"jax": "JAX", "torch": "PyTorch"}

Run = Callable[[npt.NDArray[np.uint8]], dict[str, Any]]


def use_keras_backend(backend: str) -> None:
    """Make Keras run on ``backend`` (``tensorflow``, ``jax`` or ``torch``)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
        return
    import keras

    if (running := keras.config.backend()) != backend:
        raise ModelLoadError(
            f"Keras already runs on {running} in this process, and a process has one Keras "
            f"backend: start --backend {backend} in a process of its own"
        )


def configure_keras(spec: ModelSpec) -> str:
    """Set Keras's backend, its devices and threads; return the device the model will use."""
    use_keras_backend(spec.backend)
    if spec.backend == "jax":
        if spec.device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        jax = _import("jax")
        return _device(spec, jax.default_backend() != "cpu")
    torch = _import("torch")
    device = _device(spec, torch.cuda.is_available())
    os.environ["KERAS_TORCH_DEVICE"] = "cuda" if device == "gpu" else "cpu"
    if spec.intra_op_threads:
        torch.set_num_threads(spec.intra_op_threads)
    return device


def _import(backend: str) -> Any:
    try:
        return __import__(backend)
    except ImportError as e:
        raise ModelLoadError(
            f"--backend {backend} needs {_NAMES[backend]}: pip install -e '.[{backend}]' ({e})"
        ) from e


def _device(spec: ModelSpec, has_gpu: bool) -> str:
    if spec.device == "gpu" and not has_gpu:
        raise ModelLoadError(f"--device gpu, but {_NAMES[spec.backend]} sees no GPU")
    return "gpu" if has_gpu and spec.device != "cpu" else "cpu"


def compile_serving(
    serve: Callable[[Any], dict[str, Any]], spec: ModelSpec, device: str, size: tuple[int, int]
) -> tuple[Run, dict[str, Any]]:
    """``serve`` compiled for ``spec.backend``, and its outputs on one black image (what
    says the embedding's width and the head's)."""
    assert spec.backend in KERAS_BACKENDS, spec.backend
    from keras import ops

    if spec.backend == "jax":
        import jax

        jitted = jax.jit(serve)

        def run(images: npt.NDArray[np.uint8]) -> dict[str, Any]:
            return {k: ops.convert_to_numpy(v) for k, v in jitted(images).items()}

    else:
        import torch

        target = torch.device("cuda" if device == "gpu" else "cpu")
        fn = torch.compile(serve, dynamic=False) if spec.jit_compile else serve

        def run(images: npt.NDArray[np.uint8]) -> dict[str, Any]:
            with torch.no_grad():
                out = fn(torch.as_tensor(images, device=target))
            return {k: ops.convert_to_numpy(v) for k, v in out.items()}

    return run, run(np.zeros((1, *size, 3), dtype=np.uint8))


class KerasModel:
    """A model on JAX or PyTorch through Keras 3, called from the inference thread alone."""

    def __init__(self, info: ModelInfo, run: Run) -> None:
        self._info = info
        self._run = run

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: npt.NDArray[np.uint8]) -> ModelOutputs:
        out = self._run(images)
        return ModelOutputs.copied(out["embedding"], out.get("probabilities"))
