"""What a model whose weights must be downloaded says when they cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchserve.models.downloads import build_error, keras_cache

FETCH = (
    "URL fetch failure on https://storage.googleapis.com/keras-applications/"
    "efficientnetb0_notop.h5: None -- [Errno -2] Name or service not known"
)


def test_a_failed_download_says_where_the_file_goes_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    error = build_error("keras:EfficientNetB0", "imagenet", Exception(FETCH))
    text = str(error)
    assert "keras:EfficientNetB0 needs its ImageNet weights, efficientnetb0_notop.h5" in text
    assert "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5" in text
    assert "--weights PATH" in text and f"{tmp_path / 'models'}/" in text
    assert "--model builtin" in text and "--weights none" in text
    assert keras_cache() == tmp_path / "models"


def test_other_build_failures_are_reported_as_keras_gave_them() -> None:
    error = build_error("keras:EfficientNetB0", "none", ValueError("input_shape too small"))
    assert (
        str(error) == "cannot build keras:EfficientNetB0 with weights=none: input_shape too small"
    )
