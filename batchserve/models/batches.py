"""A model's batches, numpy in and numpy out: images stacked and zero-padded to an
allowed batch size (so the compiled function sees few shapes and never retraces), the padded
outputs split back into one ``Prediction`` per image, and an image's predicted class. Used
by the inference thread and by ``batchserve index``'s engines alike."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batchserve.models.spec import ModelOutputs


@dataclass(frozen=True)
class Prediction:
    """One image's result: ``embedding`` float32 [dim] (unit norm); ``probabilities``
    float32 [classes] or None."""

    embedding: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32] | None


def padded_size(n: int, sizes: Sequence[int]) -> int:
    """The smallest allowed size >= n. ``sizes`` ascending; n <= sizes[-1]."""
    return sizes[bisect.bisect_left(sizes, n)]


def pad_batch(images: Sequence[npt.NDArray[np.uint8]], size: int) -> npt.NDArray[np.uint8]:
    """Stack ``images`` (each uint8 [H, W, 3]) into [size, H, W, 3], zero-padded."""
    first = images[0]
    out = np.zeros((size, *first.shape), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = image
    return out


def split_outputs(outputs: ModelOutputs, n: int) -> list[Prediction]:
    """The first ``n`` rows of a padded batch's outputs, one Prediction each."""
    probabilities = outputs.probabilities
    return [
        Prediction(
            embedding=outputs.embeddings[i].copy(),
            probabilities=None if probabilities is None else probabilities[i].copy(),
        )
        for i in range(n)
    ]


def predicted_class(prediction: Prediction, classes: Sequence[str] | None) -> str | None:
    """The most likely class of ``prediction``, or None for a model without a head."""
    if prediction.probabilities is None or not classes:
        return None
    return classes[int(np.argmax(prediction.probabilities))]
