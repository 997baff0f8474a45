"""The cache of converted models: named by what shapes the model and not by how it runs,
written whole or not at all, and read back as the same ModelInfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchserve.errors import ModelLoadError
from batchserve.models import converted
from batchserve.models.spec import ModelInfo, ModelSpec

RUNTIME = "openvino==1"


def test_a_setting_that_shapes_the_model_gets_its_own_copy(tmp_path: Path) -> None:
    key = converted.cache_key(ModelSpec(), RUNTIME)
    for same in (
        ModelSpec(model_cache=str(tmp_path)),
        ModelSpec(backend="openvino", device="cpu", intra_op_threads=1),
    ):
        assert converted.cache_key(same, RUNTIME) == key
    for other in (ModelSpec(pooling="avg"), ModelSpec(input_size=128), ModelSpec(fit="letterbox")):
        assert converted.cache_key(other, RUNTIME) != key
    assert converted.cache_key(ModelSpec(), "openvino==2") != key


def test_a_model_file_is_named_by_its_bytes(tmp_path: Path) -> None:
    model = tmp_path / "m.keras"
    model.write_bytes(b"one")
    spec = ModelSpec(source=str(model))
    first = converted.cache_key(spec, RUNTIME)
    model.write_bytes(b"two")
    assert converted.cache_key(spec, RUNTIME) != first
    labels = tmp_path / "labels.txt"
    labelled = ModelSpec(source=str(model), labels_file=str(labels))
    labels.write_text("a\nb\n")
    with_labels = converted.cache_key(labelled, RUNTIME)
    labels.write_text("b\na\n")
    assert converted.cache_key(labelled, RUNTIME) != with_labels


def test_a_missing_source_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        converted.cache_key(ModelSpec(source=str(tmp_path / "absent.keras")), RUNTIME)


def test_a_stored_copy_is_read_back_with_its_info(tmp_path: Path) -> None:
    info = ModelInfo("m", "src", (160, 160), 8, ["a", "b"], backend="openvino")
    folder = tmp_path / "openvino" / "key"
    assert converted.cached(folder) is None
    converted.store(folder, info, lambda tmp: (tmp / "model.xml").write_text("ir"))
    assert converted.cached(folder) == info
    assert (folder / "model.xml").read_text() == "ir"
    assert [p.name for p in folder.parent.iterdir()] == ["key"]  # no temporary folder left


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "openvino" / "key"

    def fails(tmp: Path) -> None:
        (tmp / "model.xml").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        converted.store(folder, ModelInfo("m", "src", (1, 1), 1), fails)
    assert list(folder.parent.iterdir()) == []


def test_a_copy_already_there_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "key"
    info = ModelInfo("m", "src", (1, 1), 1)
    converted.store(folder, info, lambda tmp: (tmp / "model.xml").write_text("first"))
    converted.store(folder, info, lambda tmp: (tmp / "model.xml").write_text("second"))
    assert (folder / "model.xml").read_text() == "first"


def test_an_unreadable_info_says_what_to_remove(tmp_path: Path) -> None:
    (tmp_path / converted.INFO).write_text("{not json")
    with pytest.raises(ModelLoadError, match=f"in {tmp_path} cannot be used .*: remove it"):
        converted.cached(tmp_path)


def test_a_file_changed_after_it_was_written_is_refused_not_served(tmp_path: Path) -> None:
    folder = tmp_path / "key"
    info = ModelInfo("m", "src", (1, 1), 1)
    converted.store(folder, info, lambda tmp: (tmp / "model.bin").write_bytes(b"weights"))
    (folder / "model.bin").write_bytes(bytes(7))  # zeroed on a crashed disk, say
    with pytest.raises(ModelLoadError, match=r"model\.bin is not the file that was written"):
        converted.cached(folder)
    (folder / converted.DIGESTS).unlink()
    with pytest.raises(ModelLoadError, match="it is not whole"):
        converted.cached(folder)


def test_the_code_that_builds_the_function_is_part_of_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = converted.cache_key(ModelSpec(), RUNTIME)
    code = tmp_path / "models"
    code.mkdir()
    (code / "compiled.py").write_text("# another version of the serving function")
    monkeypatch.setattr(converted, "CODE", code)
    assert converted.cache_key(ModelSpec(), RUNTIME) != key


def test_every_file_of_a_trained_models_folder_is_part_of_its_name(tmp_path: Path) -> None:
    trained = tmp_path / "furniture"
    trained.mkdir()
    (trained / "manifest.json").write_text('{"preprocess": "mobilenet_v2"}')
    spec = ModelSpec(source=str(trained))
    first = converted.cache_key(spec, RUNTIME)
    (trained / "manifest.json").write_text('{"preprocess": "none"}')
    assert converted.cache_key(spec, RUNTIME) != first
