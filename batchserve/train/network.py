"""The network ``batchserve train`` trains: a pretrained backbone, global pooling, a dense
``embedding`` layer with dropout and a softmax ``classifier``; wrapped for training in
augmentation and the server's own pixel normalisation.

Keras is imported inside the functions that build a model, so importing this module stays
cheap.
"""

from __future__ import annotations

from typing import Any

from batchserve.models import model_dir
from batchserve.models.graph import preprocess_fn
from batchserve.models.loaders import KerasBase
from batchserve.train.settings import TrainSettings


def build_models(base: KerasBase, n_classes: int, settings: TrainSettings) -> tuple[Any, Any]:
    """(inner, wrapper): ``inner`` is what is exported (normalised pixels in, ``embedding``
    and ``classifier`` layers); ``wrapper`` trains it on uint8 pixels, augmenting them and
    normalising them with the server's own function."""
    import keras

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
    x = normalise_layer(base.preprocess)(x)
    wrapper = keras.Model(raw, inner(x), name="training")
    return inner, wrapper


def normalise_layer(mode: str) -> Any:
    """The server's pixel normalisation (``graph.preprocess_fn(mode)``) as a Keras layer.

    Only the training wrapper holds it; the exported model takes normalised pixels, so the
    class is never serialised and can live inside this function.
    """
    import keras

    fn = preprocess_fn(mode)

    class Normalise(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            return fn(x)

    return Normalise()


def unfreeze_top(features: Any, count: int) -> int:
    """Make the top ``count`` layers of the backbone trainable (nested models flattened;
    batch-norm layers stay frozen); return how many layers now train."""
    import keras

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
