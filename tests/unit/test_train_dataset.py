"""Class folders for training: listing, the stratified split, the decode that skips bad
files; the validation confusion matrix and the epoch history. No TensorFlow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batchserve.errors import DatasetError
from batchserve.models.images import DecodeLimits
from batchserve.testing import encode_image
from batchserve.train.dataset import Skipped, find_examples, load_example
from batchserve.train.evaluate import confusion_matrix
from batchserve.train.fit import History


def folders(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(encode_image())
    return root


def test_one_folder_per_class_is_split_per_class(tmp_path: Path) -> None:
    data = folders(tmp_path, {"sofa": 20, "bed": 10, "chair": 1})
    (data / "bed" / ".DS_Store").write_bytes(b"x")
    found = find_examples(data, val_split=0.2, seed=3)
    assert found.classes == ["bed", "chair", "sofa"]
    val_counts = np.bincount([e.label for e in found.val], minlength=3).tolist()
    assert val_counts == [2, 0, 4]  # 20% of each; a class of one stays in training
    assert len(found.train) + len(found.val) == 31
    assert not {e.path for e in found.train} & {e.path for e in found.val}
    again = find_examples(data, val_split=0.2, seed=3)
    assert [e.path for e in again.val] == [e.path for e in found.val]
    other = find_examples(data, val_split=0.2, seed=4)
    assert [e.path for e in other.val] != [e.path for e in found.val]


def test_train_and_val_folders_are_taken_as_they_are(tmp_path: Path) -> None:
    folders(tmp_path / "train", {"a": 3, "b": 3})
    folders(tmp_path / "val", {"a": 1, "b": 2})
    found = find_examples(tmp_path, val_split=0.5)
    assert (len(found.train), len(found.val), found.val_source) == (6, 3, "val/")
    folders(tmp_path / "val", {"c": 1})
    with pytest.raises(DatasetError, match="val/ has classes that train/ lacks: c"):
        find_examples(tmp_path, val_split=0.1)


def test_too_few_classes_or_an_empty_class_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="found 1 class folder"):
        find_examples(folders(tmp_path / "one", {"a": 5}), 0.1)
    empty = folders(tmp_path / "empty", {"a": 5, "b": 0})
    with pytest.raises(DatasetError, match="b has no files"):
        find_examples(empty, 0.1)
    with pytest.raises(DatasetError, match="not a directory"):
        find_examples(tmp_path / "missing", 0.1)
    with pytest.raises(DatasetError, match="val-split"):
        find_examples(folders(tmp_path / "ok", {"a": 2, "b": 2}), 1.0)


def test_images_decode_as_the_server_decodes_them_and_bad_files_are_recorded(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode_image(fmt="PNG", colour=(200, 10, 10)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff nothing")
    skipped = Skipped()
    image, ok = load_example(str(good), (32, 48), DecodeLimits(), skipped)
    assert ok and image.shape == (32, 48, 3) and image.dtype == np.uint8
    assert tuple(image[16, 24]) == (200, 10, 10)
    image, ok = load_example(str(bad), (32, 48), DecodeLimits(), skipped)
    assert not ok and image.shape == (32, 48, 3)
    assert [path for path, _ in skipped.files] == [str(bad)]


def test_the_confusion_matrix_counts_true_against_predicted() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_the_history_keeps_the_first_epoch_with_the_lowest_monitored_loss() -> None:
    history = History("val_loss")
    bests = [
        history.record({"epoch": 1, "loss": 0.9, "val_loss": 0.8}),
        history.record({"epoch": 2, "loss": 0.5, "val_loss": 0.6}),
        history.record({"epoch": 3, "loss": 0.1, "val_loss": 0.6}),  # a tie is not better
        history.record({"epoch": 4, "loss": 0.05, "val_loss": 0.7}),
    ]
    assert bests == [True, True, False, False]
    assert (history.best_epoch, history.best_value) == (2, 0.6)
    assert [row["epoch"] for row in history.epochs] == [1, 2, 3, 4]
