"""``batchserve train``: transfer learning on class folders, exported for serving.

A pretrained backbone, frozen; global pooling; a dense ``embedding`` layer with dropout; a
softmax ``classifier``. Optionally a second phase at a lower learning rate with the top
layers of the backbone unfrozen (batch-norm layers stay frozen). The images are decoded by
the server's own decoder and normalised by the server's own function inside the graph, so
training and serving see the same pixels. The best weights by validation loss are kept;
``MODEL_DIR`` is then what ``batchserve serve --model MODEL_DIR`` loads as is.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from batchserve import model_dir, train_report
from batchserve.dataset import ClassFolders, Skipped, count_labels, decoded_dataset, find_examples
from batchserve.errors import DatasetError
from batchserve.images import DecodeLimits
from batchserve.models import KerasBase, ModelSpec, keras_base, preprocess_fn, sha256_file

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainSettings:
    data_dir: Path
    out: Path
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    name: str = ""
    embedding_dim: int = 256
    dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    val_split: float = 0.1
    unfreeze_top: int = 0
    fine_tune_epochs: int = 0  # 0: as many as --epochs
    fine_tune_learning_rate: float = 0.0  # 0: a tenth of --learning-rate
    augment: bool = True
    patience: int = 3
    seed: int = 0
    cache_file: str = ""
    max_image_pixels: int = 40_000_000

    def check(self) -> None:
        if self.embedding_dim < 1 or self.epochs < 1 or self.batch_size < 1:
            raise DatasetError("--embedding-dim, --epochs and --batch-size must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise DatasetError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.fine_tune_learning_rate < 0:
            raise DatasetError("learning rates must be positive")
        if self.unfreeze_top < 0 or self.patience < 1 or self.fine_tune_epochs < 0:
            raise DatasetError("--unfreeze-top, --fine-tune-epochs must be >= 0, --patience >= 1")

    def as_json(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "base_model": self.model.source,
            "embedding_dim": self.embedding_dim,
            "dropout": self.dropout,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "val_split": self.val_split,
            "unfreeze_top": self.unfreeze_top,
            "fine_tune_epochs": self.fine_tune_epochs or self.epochs,
            "fine_tune_learning_rate": self.fine_tune_learning_rate or self.learning_rate / 10,
            "augment": self.augment,
            "patience": self.patience,
            "seed": self.seed,
        }


def train(settings: TrainSettings, log: Log = _stderr) -> model_dir.Manifest:
    """Train on ``settings.data_dir`` and write ``settings.out``; return its manifest.

    Raises DatasetError before any training for unusable data, ModelLoadError for a base
    model that cannot be trained on.
    """
    settings.check()
    folders = find_examples(settings.data_dir, settings.val_split, settings.seed)
    out = settings.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not empty: choose a new --out or remove it")
    log(
        f"{len(folders.classes)} classes; {len(folders.train)} training and "
        f"{len(folders.val)} validation files (validation: {folders.val_source})"
    )
    keras.utils.set_random_seed(settings.seed)
    base = keras_base(settings.model)
    log(f"base model {base.name} ({base.source}), input {base.input_size[0]}x{base.input_size[1]}")
    data = _Data.decode(folders, base.input_size, settings, log)
    inner, wrapper = build_models(base, len(folders.classes), settings)
    with tempfile.TemporaryDirectory(prefix="batchserve-train-") as scratch:
        best = Path(scratch) / "best.weights.h5"
        history = _fit(base, wrapper, data, settings, best, log)
        wrapper.load_weights(best)
    evaluation = _evaluate(wrapper, data)
    return _export(settings, base, inner, folders, data, history, evaluation, log)


@dataclass
class _Data:
    train: Any
    val: Any
    train_count: int
    val_count: int
    skipped: Skipped
    decode_s: float

    @classmethod
    def decode(
        cls, folders: ClassFolders, size: tuple[int, int], settings: TrainSettings, log: Log
    ) -> _Data:
        """Decode every file once (filling the cache); refuse a class left without images."""
        limits = DecodeLimits(settings.max_image_pixels)
        skipped = Skipped()
        cache = settings.cache_file
        train = decoded_dataset(folders.train, size, limits, skipped, cache)
        val = decoded_dataset(folders.val, size, limits, skipped, cache + ".val" if cache else "")
        started = time.perf_counter()
        train_counts = count_labels(train)
        val_counts = count_labels(val)
        decode_s = time.perf_counter() - started
        for path, reason in sorted(skipped.files)[:20]:
            log(f"skipped {path}: {reason}")
        if skipped.files:
            log(f"skipped {len(skipped.files)} files that are not readable images")
        empty = [c for i, c in enumerate(folders.classes) if not train_counts[i]]
        if empty:
            raise DatasetError(f"no readable training image in class(es): {', '.join(empty)}")
        n_train, n_val = sum(train_counts.values()), sum(val_counts.values())
        log(f"decoded {n_train + n_val} images in {decode_s:.1f} s")
        batch = settings.batch_size
        # Filtering hid the sizes from tf.data; they are known now.
        train = train.apply(tf.data.experimental.assert_cardinality(n_train))
        val = val.apply(tf.data.experimental.assert_cardinality(n_val))
        shuffled = train.shuffle(n_train, seed=settings.seed, reshuffle_each_iteration=True)
        return cls(
            train=shuffled.batch(batch).prefetch(tf.data.AUTOTUNE),
            val=val.batch(batch).prefetch(tf.data.AUTOTUNE) if n_val else None,
            train_count=n_train,
            val_count=n_val,
            skipped=skipped,
            decode_s=decode_s,
        )


def build_models(base: KerasBase, n_classes: int, settings: TrainSettings) -> tuple[Any, Any]:
    """(inner, wrapper): ``inner`` is what is exported (normalised pixels in, ``embedding``
    and ``classifier`` layers); ``wrapper`` trains it on uint8 pixels, augmenting them and
    normalising them with the server's own function."""
    height, width = base.input_size
    pixels = keras.Input((height, width, 3), name="normalised")
    features = base.features(pixels, training=False)  # batch norm stays in inference mode
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D()(features)
    embedding = keras.layers.Dense(
        settings.embedding_dim, activation="relu", name=model_dir.EMBEDDING_LAYER
    )(features)
    dropped = keras.layers.Dropout(settings.dropout)(embedding)
    probabilities = keras.layers.Dense(
        n_classes, activation="softmax", name=model_dir.CLASSIFIER_LAYER
    )(dropped)
    inner = keras.Model(pixels, probabilities, name=settings.name or settings.out.name)

    raw = keras.Input((height, width, 3), dtype="uint8", name="pixels")
    x = keras.ops.cast(raw, "float32")
    if settings.augment:
        seed = settings.seed
        x = keras.layers.RandomFlip("horizontal", seed=seed)(x)
        x = keras.layers.RandomRotation(0.05, fill_mode="reflect", seed=seed)(x)
        x = keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed)(x)
        x = keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed)(x)
    x = Normalise(base.preprocess)(x)
    wrapper = keras.Model(raw, inner(x), name="training")
    return inner, wrapper


class Normalise(keras.layers.Layer):  # type: ignore[misc]
    """The server's pixel normalisation (``models.preprocess_fn``) as a layer."""

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.fn = preprocess_fn(mode)

    def call(self, x: Any) -> Any:
        return self.fn(x)


def unfreeze_top(features: Any, count: int) -> int:
    """Make the top ``count`` layers of the backbone trainable (nested models flattened;
    batch-norm layers stay frozen); return how many layers now train."""
    layers = [layer for layer in _flatten(features) if layer.weights]
    features.trainable = True
    for layer in layers:
        layer.trainable = False
    unfrozen = 0
    for layer in layers[len(layers) - count :] if count else []:
        if not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
            unfrozen += 1
    return unfrozen


def _flatten(model: Any) -> list[Any]:
    out: list[Any] = []
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out += _flatten(layer)
        else:
            out.append(layer)
    return out


class Progress(keras.callbacks.Callback):  # type: ignore[misc]
    """One line per epoch; the weights saved whenever the monitored loss is the best yet
    (across both phases)."""

    def __init__(self, total: int, images: int, monitor: str, best: Path, log: Log) -> None:
        super().__init__()
        self.total, self.images, self.monitor = total, images, monitor
        self.best_path, self.log = best, log
        self.best_value = float("inf")
        self.best_epoch = 0
        self.epochs: list[dict[str, float]] = []
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        seconds = time.perf_counter() - self.started
        row = {k: float(v) for k, v in (logs or {}).items()}
        row.update(epoch=epoch + 1, seconds=seconds, images_per_s=self.images / seconds)
        self.epochs.append(row)
        value = row.get(self.monitor, float("inf"))
        if value < self.best_value:
            self.best_value, self.best_epoch = value, epoch + 1
            self.model.save_weights(self.best_path)
        shown = " ".join(
            f"{k} {row[k]:.4f}"
            for k in ("loss", "accuracy", "val_loss", "val_accuracy")
            if k in row
        )
        self.log(
            f"epoch {epoch + 1}/{self.total}: {shown} "
            f"({row['images_per_s']:.0f} images/s, {seconds:.1f} s)"
        )


def _fit(
    base: KerasBase, wrapper: Any, data: _Data, settings: TrainSettings, best: Path, log: Log
) -> Progress:
    monitor = "val_loss" if data.val is not None else "loss"
    fine_epochs = (settings.fine_tune_epochs or settings.epochs) if settings.unfreeze_top else 0
    total = settings.epochs + fine_epochs
    progress = Progress(total, data.train_count, monitor, best, log)

    def fit(learning_rate: float, initial: int, until: int) -> None:
        wrapper.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=settings.patience)
        wrapper.fit(
            data.train,
            validation_data=data.val,
            initial_epoch=initial,
            epochs=until,
            callbacks=[progress, stop],
            shuffle=False,  # the dataset shuffles itself, every epoch
            verbose=0,
        )

    base.features.trainable = False
    fit(settings.learning_rate, 0, settings.epochs)
    if settings.unfreeze_top:
        wrapper.load_weights(best)  # the second phase starts from the best of the first
        n = unfreeze_top(base.features, settings.unfreeze_top)
        rate = settings.fine_tune_learning_rate or settings.learning_rate / 10
        log(f"fine-tuning the top {n} backbone layers at learning rate {rate:g}")
        fit(rate, len(progress.epochs), len(progress.epochs) + fine_epochs)
    return progress


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    confusion: list[list[int]]


def confusion_matrix(true: np.ndarray[Any, Any], predicted: np.ndarray[Any, Any], n: int) -> Any:
    """Counts ``[true class][predicted class]``."""
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def _evaluate(wrapper: Any, data: _Data) -> Evaluation | None:
    if data.val is None:
        return None
    true, probabilities = [], []
    for images, labels in data.val:
        probabilities.append(wrapper(images, training=False).numpy())
        true.append(labels.numpy())
    p = np.concatenate(probabilities)
    t = np.concatenate(true)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(len(t)), t], 1e-12))))
    predicted = p.argmax(axis=1)
    matrix = confusion_matrix(t, predicted, p.shape[1])
    return Evaluation(float(np.mean(predicted == t)), loss, matrix.tolist())


def _export(
    settings: TrainSettings,
    base: KerasBase,
    inner: Any,
    folders: ClassFolders,
    data: _Data,
    progress: Progress,
    evaluation: Evaluation | None,
    log: Log,
) -> model_dir.Manifest:

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / model_dir.MODEL_FILE
    inner.save(model_file)
    epochs = progress.epochs
    best_row = next(row for row in epochs if row["epoch"] == progress.best_epoch)
    metrics: dict[str, Any] = {
        "best_epoch": progress.best_epoch,
        "epochs_run": len(epochs),
        "train_loss": round(best_row["loss"], 4),
        "train_accuracy": round(best_row["accuracy"], 4),
        "train_images": data.train_count,
        "val_images": data.val_count,
        "skipped_files": len(data.skipped.files),
        # Medians: the first epoch also traces the graph.
        "seconds_per_epoch": round(float(np.median([r["seconds"] for r in epochs])), 2),
        "images_per_s": round(float(np.median([r["images_per_s"] for r in epochs])), 1),
    }
    if evaluation is not None:
        metrics.update(
            val_loss=round(evaluation.loss, 4), val_accuracy=round(evaluation.accuracy, 4)
        )
    manifest = model_dir.Manifest(
        name=settings.name or out.name,
        base={"source": base.source, "name": base.name, "weights_sha256": base.weights_sha256},
        input_size=base.input_size,
        preprocess=base.preprocess,
        embedding_dim=settings.embedding_dim,
        classes=folders.classes,
        weights_sha256=sha256_file(model_file),
        training=settings.as_json(),
        metrics=metrics,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    model_dir.write(out, manifest)
    train_report.write(out, manifest, epochs, evaluation, data.skipped.files, data.decode_s)
    log(
        f"wrote {out}: best epoch {progress.best_epoch}"
        + (f", val accuracy {evaluation.accuracy:.3f}" if evaluation else "")
    )
    return manifest
