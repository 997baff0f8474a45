"""Class folders for ``batchserve train``: which images, which class, which split, and a
``tf.data`` pipeline that decodes them exactly as the server does.

``DATA_DIR`` holds one sub-folder per class, or ``train/`` and ``val/`` each holding the
same class folders. Hidden files are ignored; every other file is a candidate image, and
one that does not decode is skipped and reported instead of stopping the run.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchserve.errors import BatchserveError, DatasetError
from batchserve.models.images import DecodeLimits, decode_image


@dataclass(frozen=True)
class Example:
    path: Path
    label: int


@dataclass
class ClassFolders:
    """The examples of a data directory, split into training and validation."""

    classes: list[str]
    train: list[Example]
    val: list[Example]
    val_source: str  # where the validation set came from, for the report


@dataclass
class Skipped:
    """Files that did not decode, with why (filled while the pipeline first runs)."""

    files: list[tuple[str, str]] = field(default_factory=list)


def find_examples(data_dir: Path, val_split: float, seed: int = 0) -> ClassFolders:
    """The classes and examples under ``data_dir``. Raises DatasetError, before anything
    is decoded, for fewer than 2 classes or a class folder without files."""
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a directory")
    if not 0.0 <= val_split < 1.0:
        raise DatasetError(f"--val-split must be in [0, 1), got {val_split}")
    if (data_dir / "train").is_dir():
        classes, train_by_class = _class_files(data_dir / "train")
        if (data_dir / "val").is_dir():
            val_classes, val_by_class = _class_files(data_dir / "val", minimum=0)
            unknown = sorted(set(val_classes) - set(classes))
            if unknown:
                raise DatasetError(f"val/ has classes that train/ lacks: {', '.join(unknown)}")
            train = _examples(train_by_class, classes)
            val = _examples(val_by_class, classes)
            return ClassFolders(classes, train, val, "val/")
    else:
        classes, train_by_class = _class_files(data_dir)
    train, val = split(train_by_class, classes, val_split, seed)
    return ClassFolders(classes, train, val, f"{val_split:.0%} of each class")


def _class_files(root: Path, minimum: int = 2) -> tuple[list[str], dict[str, list[Path]]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < minimum:
        raise DatasetError(
            f"found {len(folders)} class folder(s) in {root}; training needs at least 2 "
            "(one sub-folder of images per class)"
        )
    by_class: dict[str, list[Path]] = {}
    for folder in folders:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files and minimum:
            raise DatasetError(f"class folder {folder} has no files")
        by_class[folder.name] = files
    return [f.name for f in folders], by_class


def _examples(by_class: dict[str, list[Path]], classes: list[str]) -> list[Example]:
    return [Example(p, classes.index(name)) for name, paths in by_class.items() for p in paths]


def split(
    by_class: dict[str, list[Path]], classes: list[str], val_split: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Stratified: ``val_split`` of each class (at least one image of a class with two or
    more, and never all of it) goes to validation, chosen by ``seed``."""
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for name in classes:
        paths = list(by_class[name])
        rng.shuffle(paths)
        n_val = 0
        if val_split > 0 and len(paths) >= 2:
            n_val = min(len(paths) - 1, max(1, round(len(paths) * val_split)))
        label = classes.index(name)
        val += [Example(p, label) for p in sorted(paths[:n_val])]
        train += [Example(p, label) for p in sorted(paths[n_val:])]
    return train, val


def load_example(
    path: str,
    size: tuple[int, int],
    limits: DecodeLimits,
    skipped: Skipped,
    fit: tuple[bool, bool] = (False, False),
) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], bool]:
    """The image at ``path`` decoded as the server decodes it (uint8, ``size`` = (height,
    width); ``fit``: letterboxed, borders trimmed), and whether it could be; a failure is
    recorded in ``skipped``."""
    letterbox, trim_borders = fit
    try:
        data = Path(path).read_bytes()
        return decode_image(
            data, size, limits, letterbox=letterbox, trim_borders=trim_borders
        ), True
    except (BatchserveError, OSError) as e:
        skipped.files.append((path, str(e)))
        return np.zeros((*size, 3), dtype=np.uint8), False


def decoded_dataset(
    examples: Sequence[Example],
    size: tuple[int, int],
    limits: DecodeLimits,
    skipped: Skipped,
    cache_file: str = "",
    fit: tuple[bool, bool] = (False, False),
) -> Any:
    """A ``tf.data.Dataset`` of (uint8 image, label): decoded and resized in parallel by
    the server's decoder, failures dropped, cached in memory (or in ``cache_file``) so that
    only the first pass decodes."""
    import tensorflow as tf

    height, width = size

    def load(path: Any, label: Any) -> tuple[Any, Any, Any]:
        image, ok = tf.numpy_function(
            lambda p: load_example(p.decode(), size, limits, skipped, fit),
            [path],
            [tf.uint8, tf.bool],
            stateful=False,
        )
        image.set_shape((height, width, 3))
        ok.set_shape(())
        return image, label, ok

    paths = [str(e.path) for e in examples]
    labels = np.array([e.label for e in examples], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.filter(_decoded).map(_without_flag).cache(cache_file)


def _decoded(image: Any, label: Any, ok: Any) -> Any:
    return ok


def _without_flag(image: Any, label: Any, ok: Any) -> tuple[Any, Any]:
    return image, label


def count_labels(ds: Any) -> Counter[int]:
    """Run ``ds`` once (filling its cache) and count its examples by label."""
    counts: Counter[int] = Counter()
    for _image, labels in ds.batch(256):
        counts.update(int(x) for x in labels.numpy())
    return counts
