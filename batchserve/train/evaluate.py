"""The trained model measured on the validation set: accuracy, loss, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Evaluation:
    accuracy: float
    loss: float  # mean cross-entropy, natural log
    confusion: list[list[int]]  # [true class][predicted class]


def confusion_matrix(true: np.ndarray[Any, Any], predicted: np.ndarray[Any, Any], n: int) -> Any:
    """Counts ``[true class][predicted class]``."""
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def evaluate(model: Any, val: Any) -> Evaluation | None:
    """``model`` (uint8 pixels in, class probabilities out) on the batched dataset ``val``
    of (image, label); None when there is no validation set."""
    if val is None:
        return None
    true, probabilities = [], []
    for images, labels in val:
        probabilities.append(model(images, training=False).numpy())
        true.append(labels.numpy())
    p = np.concatenate(probabilities)
    t = np.concatenate(true)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(len(t)), t], 1e-12))))
    predicted = p.argmax(axis=1)
    matrix = confusion_matrix(t, predicted, p.shape[1])
    return Evaluation(float(np.mean(predicted == t)), loss, matrix.tolist())
