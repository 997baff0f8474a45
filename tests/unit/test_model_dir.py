"""The model directory ``batchserve train`` writes and the server reads back: the manifest
and the labels. No TensorFlow."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchserve.errors import ModelLoadError
from batchserve.models import model_dir


def test_the_manifest_round_trips_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    manifest = model_dir.Manifest(
        name="furniture",
        base={"source": "builtin"},
        input_size=(160, 160),
        preprocess="tf",
        embedding_dim=256,
        classes=["bed", "sofa"],
        weights_sha256="ab" * 32,
        metrics={"val_accuracy": 0.9},
    )
    model_dir.write(tmp_path, manifest)
    assert model_dir.is_model_dir(tmp_path)
    assert model_dir.read(tmp_path) == manifest
    assert (tmp_path / "labels.txt").read_text() == "bed\nsofa\n"
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ModelLoadError, match="not a batchserve-trained-model manifest"):
        model_dir.read(tmp_path)
