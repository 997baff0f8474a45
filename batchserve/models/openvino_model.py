"""The OpenVINO backend (``--backend openvino``, CPUs): the model's serving function (uint8
pixels in; embeddings and probabilities out, pooled and normalised as on TensorFlow)
converted once from TensorFlow with ``openvino.convert_model``, kept in the cache of
converted models, and compiled for the CPU. A start that finds it cached imports no
TensorFlow. Runs in float32 unless ``--precision bf16``: OpenVINO would pick bfloat16 on
CPUs that have it, which moves embeddings (``python -m bench precision``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.errors import ModelLoadError
from batchserve.models import converted
from batchserve.models.compiled import TensorFlowModel
from batchserve.models.spec import ModelInfo, ModelOutputs, ModelSpec

log = logging.getLogger(__name__)

RUNTIME = "openvino"
IR_FILE = "model.xml"  # with model.bin beside it
#: The outputs the serving function names (graph.serving_function).
OUTPUTS = ("embedding", "probabilities")


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise ModelLoadError(
            "--backend openvino needs OpenVINO: pip install -e '.[openvino]'"
        ) from e
    return openvino


def compile_config(spec: ModelSpec) -> dict[str, str]:
    """OpenVINO's CPU settings: a batch at a time as fast as it goes, in float32 unless
    ``--precision bf16``."""
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": spec.precision}
    if spec.intra_op_threads:
        config["INFERENCE_NUM_THREADS"] = str(spec.intra_op_threads)
    return config


def load_openvino(
    spec: ModelSpec, load_tensorflow: Callable[[ModelSpec], TensorFlowModel]
) -> OpenVinoModel:
    """``spec``'s model on OpenVINO: from the cache, else converted from the TensorFlow
    model ``load_tensorflow`` loads (on the CPU) and cached."""
    if spec.device == "gpu":
        raise ModelLoadError(
            "--backend openvino runs on CPUs: serve a GPU with --backend tensorflow"
        )
    ov = import_openvino()
    folder = converted.cache_root(spec) / RUNTIME / converted.cache_key(spec, _runtime(ov))
    info = converted.cached(folder)
    if info is None:
        info = _convert(spec, ov, folder, load_tensorflow)
    else:
        log.info("model: OpenVINO's copy from %s", folder)
    try:
        compiled = ov.Core().compile_model(str(folder / IR_FILE), "CPU", compile_config(spec))
    except RuntimeError as e:  # OpenVINO's own checks of what it reads
        raise converted.unusable(folder, str(e).splitlines()[0]) from e
    return OpenVinoModel(info, compiled)


def _runtime(ov: Any) -> str:
    return f"{RUNTIME}=={ov.get_version()}"


def _convert(
    spec: ModelSpec, ov: Any, folder: Path, load_tensorflow: Callable[[ModelSpec], TensorFlowModel]
) -> ModelInfo:
    started = time.monotonic()
    try:
        tf_model = load_tensorflow(dataclasses.replace(spec, device="cpu"))
    except ImportError as e:
        raise ModelLoadError(
            f"--backend openvino converts the model from TensorFlow on its first start ({e}): "
            f"install the cpu extra, or copy a converted model into {folder.parent}"
        ) from e
    try:
        ir = ov.convert_model(tf_model.concrete)
    except Exception as e:  # the converter raises its own types for unsupported ops
        raise ModelLoadError(f"OpenVINO cannot convert {spec.source}: {e}") from e
    _name_outputs(ir, tf_model.concrete)
    info = dataclasses.replace(tf_model.info, backend=RUNTIME, device="cpu")
    # save_model would halve the weights to float16 by default: kept in float32.
    converted.store(
        folder, info, lambda tmp: ov.save_model(ir, str(tmp / IR_FILE), compress_to_fp16=False)
    )
    log.info(
        "model: converted for OpenVINO in %.1f s, kept in %s", time.monotonic() - started, folder
    )
    return info


def _name_outputs(ir: Any, concrete: Any) -> None:
    """Give the IR's outputs the serving function's names, in its flattened order (the
    converter keeps the order, not always the names)."""
    import tensorflow as tf

    names = tf.nest.flatten(
        {name: name for name in concrete.structured_outputs}, expand_composites=False
    )
    if len(names) != len(ir.outputs):
        raise ModelLoadError(f"OpenVINO's copy has {len(ir.outputs)} outputs, not {names}")
    for output, name in zip(ir.outputs, names, strict=True):
        output.get_tensor().set_names({name})


class OpenVinoModel:
    """A model compiled by OpenVINO for the CPU, called from the inference thread alone."""

    def __init__(self, info: ModelInfo, compiled: Any) -> None:
        self._info = info
        self._request = compiled.create_infer_request()
        self._ports = {name: compiled.output(name) for name in OUTPUTS if _has(compiled, name)}

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: npt.NDArray[np.uint8]) -> ModelOutputs:
        out = self._request.infer([np.ascontiguousarray(images)], share_inputs=True)
        probabilities = self._ports.get("probabilities")
        return ModelOutputs.copied(
            out[self._ports["embedding"]], None if probabilities is None else out[probabilities]
        )


def _has(compiled: Any, name: str) -> bool:
    return any(name in port.get_names() for port in compiled.outputs)
