"""``--backend auto``, the default: OpenVINO where the model runs on a CPU and OpenVINO is
installed (about twice TensorFlow's images/s there), else TensorFlow; and TensorFlow when
OpenVINO cannot serve the model it was given."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from batchserve.errors import ModelLoadError
from batchserve.models import loaders, spec
from batchserve.models.spec import ModelSpec, chosen_backend

NO_OPENVINO = "OpenVINO is not installed: pip install -e '.[openvino]'"


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec, "nvidia_gpu", lambda: False)


def installed(monkeypatch: pytest.MonkeyPatch, *absent: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a)
    )


def test_auto_is_openvino_on_a_cpu_where_it_is_installed(
    no_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    assert ModelSpec().backend == "auto"
    assert chosen_backend(ModelSpec()) == "openvino"
    assert chosen_backend(ModelSpec(device="cpu")) == "openvino"
    installed(monkeypatch, "openvino")
    assert chosen_backend(ModelSpec()) == "tensorflow"


def test_auto_leaves_a_savedmodel_to_tensorflow(no_gpu: None, tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert chosen_backend(ModelSpec(source=str(tmp_path))) == "tensorflow"
    assert chosen_backend(ModelSpec(source=str(tmp_path), backend="openvino")) == "openvino"


def test_auto_is_tensorflow_where_there_is_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec, "nvidia_gpu", lambda: True)
    assert chosen_backend(ModelSpec()) == "tensorflow"
    assert chosen_backend(ModelSpec(device="gpu")) == "tensorflow"
    assert chosen_backend(ModelSpec(device="cpu")) in ("openvino", "tensorflow")


def test_a_backend_named_is_the_backend_used(no_gpu: None) -> None:
    for backend in ("tensorflow", "jax", "torch", "openvino"):
        assert chosen_backend(ModelSpec(backend=backend)) == backend


def test_auto_falls_back_to_tensorflow_where_openvino_cannot_serve_the_model(
    no_gpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("openvino", reason=NO_OPENVINO)
    from batchserve.models import openvino_model

    def cannot(_spec: ModelSpec, _load: Any) -> Any:
        raise ModelLoadError("OpenVINO cannot convert it: op FancyOp")

    loaded: list[str] = []
    monkeypatch.setattr(openvino_model, "load_openvino", cannot)
    monkeypatch.setattr(loaders, "load_native", lambda s: loaded.append(s.backend) or "model")
    assert loaders.load_model(ModelSpec()) == "model" and loaded == ["tensorflow"]
    assert "OpenVINO cannot serve the model" in caplog.text
    with pytest.raises(ModelLoadError, match="FancyOp"):  # asked for by name: no fallback
        loaders.load_model(ModelSpec(backend="openvino"))
