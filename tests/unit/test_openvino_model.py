"""The OpenVINO backend's choices that need no model: where it refuses to run, how it is
compiled, and what a first start without TensorFlow says."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchserve.errors import ModelLoadError
from batchserve.models import openvino_model
from batchserve.models.compiled import TensorFlowModel
from batchserve.models.spec import ModelSpec


def never(_spec: ModelSpec) -> TensorFlowModel:
    raise AssertionError("TensorFlow was not to be loaded")


def test_a_gpu_is_refused_with_the_backend_that_runs_on_one() -> None:
    with pytest.raises(ModelLoadError, match="--backend tensorflow"):
        openvino_model.load_openvino(ModelSpec(backend="openvino", device="gpu"), never)


def test_compiled_in_float32_for_latency_on_the_threads_asked_for() -> None:
    config = openvino_model.compile_config(ModelSpec(backend="openvino"))
    assert config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    threads = openvino_model.compile_config(ModelSpec(backend="openvino", intra_op_threads=2))
    assert threads["INFERENCE_NUM_THREADS"] == "2"
    bf16 = openvino_model.compile_config(ModelSpec(backend="openvino", precision="bf16"))
    assert bf16["INFERENCE_PRECISION_HINT"] == "bf16"


def test_a_first_start_without_tensorflow_says_what_to_install(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="pip install -e '.[openvino]'")

    def no_tensorflow(_spec: ModelSpec) -> TensorFlowModel:
        raise ModuleNotFoundError("No module named 'tensorflow'")

    spec = ModelSpec(backend="openvino", model_cache=str(tmp_path))
    with pytest.raises(ModelLoadError, match="install the cpu extra, or copy a converted model"):
        openvino_model.load_openvino(spec, no_tensorflow)
    assert not (tmp_path / "openvino").exists()  # nothing half-made left
