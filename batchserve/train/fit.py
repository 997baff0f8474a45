"""``batchserve train``: transfer learning on class folders, exported for serving.

A pretrained backbone, frozen; global pooling; a dense ``embedding`` layer with dropout; a
softmax ``classifier``. Optionally a second phase at a lower learning rate with the top
layers of the backbone unfrozen (batch-norm layers stay frozen). The images are decoded by
the server's own decoder and normalised by the server's own function inside the graph, so
training and serving see the same pixels. The best weights by validation loss are kept;
``MODEL_DIR`` is then what ``batchserve serve --model MODEL_DIR`` loads as is.

TensorFlow and Keras are imported inside the functions that build and run the model, so
``batchserve train --help`` answers at once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from batchserve.errors import DatasetError
from batchserve.models import model_dir
from batchserve.models.compiled import import_tensorflow_quietly
from batchserve.models.loaders import KerasBase, keras_base
from batchserve.models.spec import sha256_file
from batchserve.train import report
from batchserve.train.dataset import (
    ClassFolders,
    Skipped,
    count_labels,
    decoded_dataset,
    find_examples,
)
from batchserve.train.evaluate import Evaluation, evaluate
from batchserve.train.network import build_models, unfreeze_top
from batchserve.train.settings import TrainSettings

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train(settings: TrainSettings, log: Log = _stderr) -> model_dir.Manifest:
    """Train on ``settings.data_dir`` and write ``settings.out``; return its manifest.

    Raises DatasetError before any training for unusable data, ModelLoadError for a base
    model that cannot be trained on, ModuleNotFoundError (``name`` "matplotlib") without
    the ``train`` extra.
    """
    report.require_matplotlib()
    folders = find_examples(settings.data_dir, settings.val_split, settings.seed)
    out = settings.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out} exists and is not empty: choose a new --out or remove it")
    log(
        f"{len(folders.classes)} classes; {len(folders.train)} training and "
        f"{len(folders.val)} validation files (validation: {folders.val_source})"
    )
    import_tensorflow_quietly()  # before Keras loads it
    import keras

    keras.utils.set_random_seed(settings.seed)
    base = keras_base(settings.model)
    log(f"base model {base.name} ({base.source}), input {base.input_size[0]}x{base.input_size[1]}")
    data = _Data.decode(folders, base.input_size, settings, log)
    inner, wrapper = build_models(base, len(folders.classes), settings)
    with tempfile.TemporaryDirectory(prefix="batchserve-train-") as scratch:
        best = Path(scratch) / "best.weights.h5"
        history = _fit(base, wrapper, data, settings, best, log)
        wrapper.load_weights(best)
    evaluation = evaluate(wrapper, data.val)
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
        import tensorflow as tf

        limits = settings.images
        skipped = Skipped()
        cache = settings.cache_file
        # Fitted to the input as the server will fit them (--fit, --trim-borders).
        fit = (settings.model.fit == "letterbox", settings.model.trim_borders)
        train = decoded_dataset(folders.train, size, limits, skipped, cache, fit)
        val_cache = cache + ".val" if cache else ""
        val = decoded_dataset(folders.val, size, limits, skipped, val_cache, fit)
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


@dataclass
class History:
    """Every epoch's row (``loss``, ``accuracy``, ``val_*``, ``epoch``, ``seconds``,
    ``images_per_s``) across both phases, and the best epoch by the monitored loss."""

    monitor: str  # "val_loss", or "loss" without a validation set
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_value: float = float("inf")
    best_epoch: int = 0  # 1-based; 0 before the first epoch

    def record(self, row: dict[str, float]) -> bool:
        """Append ``row``; True when it is the best so far."""
        self.epochs.append(row)
        value = row.get(self.monitor, float("inf"))
        if value < self.best_value:
            self.best_value, self.best_epoch = value, int(row["epoch"])
            return True
        return False


def _progress(history: History, total: int, images: int, best: Path, log: Log) -> Any:
    """A Keras callback: one line per epoch into ``log``, each epoch's row into
    ``history``, and the weights saved to ``best`` whenever the epoch is the best yet."""
    import keras

    class Progress(keras.callbacks.Callback):  # type: ignore[misc]
        started = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            seconds = time.perf_counter() - self.started
            row = {k: float(v) for k, v in (logs or {}).items()}
            row.update(epoch=epoch + 1, seconds=seconds, images_per_s=images / seconds)
            if history.record(row):
                self.model.save_weights(best)
            shown = " ".join(
                f"{k} {row[k]:.4f}"
                for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                if k in row
            )
            log(
                f"epoch {epoch + 1}/{total}: {shown} "
                f"({row['images_per_s']:.0f} images/s, {seconds:.1f} s)"
            )

    return Progress()


def _fit(
    base: KerasBase, wrapper: Any, data: _Data, settings: TrainSettings, best: Path, log: Log
) -> History:
    import keras

    monitor = "val_loss" if data.val is not None else "loss"
    fine_epochs = (settings.fine_tune_epochs or settings.epochs) if settings.unfreeze_top else 0
    total = settings.epochs + fine_epochs
    history = History(monitor)
    progress = _progress(history, total, data.train_count, best, log)

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
        fit(rate, len(history.epochs), len(history.epochs) + fine_epochs)
    return history


def _export(
    settings: TrainSettings,
    base: KerasBase,
    inner: Any,
    folders: ClassFolders,
    data: _Data,
    history: History,
    evaluation: Evaluation | None,
    log: Log,
) -> model_dir.Manifest:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / model_dir.MODEL_FILE
    inner.save(model_file)
    epochs = history.epochs
    best_row = next(row for row in epochs if row["epoch"] == history.best_epoch)
    metrics: dict[str, Any] = {
        "best_epoch": history.best_epoch,
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
    report.write(out, manifest, epochs, evaluation, data.skipped.files, data.decode_s)
    log(
        f"wrote {out}: best epoch {history.best_epoch}"
        + (f", val accuracy {evaluation.accuracy:.3f}" if evaluation else "")
    )
    return manifest
