"""What the serving function computes, written once in Keras ops so that every backend
(TensorFlow, JAX, PyTorch; OpenVINO converts TensorFlow's) computes the same embedding:
uint8 pixels in, normalised inside the graph, features pooled into L2-normalised
embeddings, class probabilities from the head. compiled.py and keras_backends.py only say
how each backend compiles and calls it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchserve.errors import ModelLoadError
from batchserve.models.spec import ModelSpec

#: ImageNet's channel statistics, as torch-style (RGB, 0..1) and caffe-style (BGR, 0..255)
#: normalisation subtract them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class InputHead:
    """A classifier computed from the preprocessed input rather than from the features."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn


def preprocess_fn(mode: str) -> Callable[[Any], Any]:
    """Pixel normalisation in Keras ops: float32 0..255 RGB in, model input out."""
    from keras import ops

    if mode == "tf":
        return lambda x: x / 127.5 - 1.0
    if mode == "unit":
        return lambda x: x / 255.0
    if mode == "torch":
        mean, std = ops.array(_IMAGENET_MEAN), ops.array(_IMAGENET_STD)
        return lambda x: (x / 255.0 - mean) / std
    if mode == "caffe":
        mean_bgr = ops.array(_CAFFE_MEAN_BGR)
        return lambda x: ops.flip(x, axis=-1) - mean_bgr
    if mode == "none":
        return lambda x: x
    raise ModelLoadError(f"unknown preprocess mode {mode!r}")


def l2_normalise(features: Any) -> Any:
    """Rows scaled to unit L2 norm. Scales by the largest magnitude first, so that tiny
    features (random weights give norms near 1e-9) still come out with norm 1."""
    from keras import ops

    scale = ops.max(ops.abs(features), axis=1, keepdims=True)
    scaled = features / ops.maximum(scale, 1e-30)
    squares = ops.sum(ops.square(scaled), axis=1, keepdims=True)
    return scaled * ops.rsqrt(ops.maximum(squares, 1e-12))


def pool_map(feature_map: Any, spec: ModelSpec) -> Any:
    """[N, h, w, c] -> [N, c]: generalized mean (GeM, ``spec.gem_p``; values clamped at a
    small positive floor) or the plain average. GeM weighs the strongest responses more, so
    a border, a crop or a banner moves the embedding less (bench/RESULTS.md, search
    quality)."""
    from keras import ops

    if p := spec.gem_exponent():
        powered = ops.power(ops.maximum(feature_map, 1e-6), p)
        return ops.power(ops.mean(powered, axis=(1, 2)), 1.0 / p)
    return ops.mean(feature_map, axis=(1, 2))


def serving_function(
    normalise: Callable[[Any], Any],
    features: Any,
    head: Any,
    spec: ModelSpec,
    traced: dict[str, bool],
) -> Callable[[Any], dict[str, Any]]:
    """uint8 images -> {"embedding": unit rows, "probabilities": softmax rows (with a head)}:
    the graph each backend compiles. A feature map is pooled as ``spec`` says into the
    embedding (``traced["pools_map"]`` records that it was a map), and averaged for the
    head, as the head was trained."""
    from keras import ops

    def serve(images: Any) -> dict[str, Any]:
        x = normalise(ops.cast(images, "float32"))
        feats = features(x, training=False) if hasattr(features, "layers") else features(x)
        embedding = feats
        if len(feats.shape) == 4:
            traced["pools_map"] = True
            embedding = pool_map(ops.cast(feats, "float32"), spec)
            feats = ops.mean(feats, axis=(1, 2))
        out = {"embedding": l2_normalise(ops.cast(embedding, "float32"))}
        if isinstance(head, InputHead):
            out["probabilities"] = ops.cast(head.fn(feats, x), "float32")
        elif head is not None:
            logits = head(feats, training=False)
            activation = getattr(head, "activation", None)
            if getattr(activation, "__name__", "") != "softmax":
                logits = ops.softmax(logits, axis=-1)
            out["probabilities"] = ops.cast(logits, "float32")
        return out

    return serve
