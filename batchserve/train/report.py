"""What ``batchserve train`` writes next to the model besides it: ``report.json`` (the final
metrics, every epoch, the confusion matrix, the skipped files), ``history.png`` and
``confusion.png``.

The plots need matplotlib, which the ``train`` extra installs and serving does without: it
is imported when a plot is drawn, and ``require_matplotlib`` checks for it up front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchserve.models.model_dir import Manifest
from batchserve.train.evaluate import Evaluation

REPORT = "report.json"
HISTORY_PLOT = "history.png"
CONFUSION_PLOT = "confusion.png"


def write(
    out: Path,
    manifest: Manifest,
    epochs: list[dict[str, float]],
    evaluation: Evaluation | None,
    skipped: list[tuple[str, str]],
    decode_s: float,
) -> None:
    doc = {
        "name": manifest.name,
        "classes": manifest.classes,
        "metrics": manifest.metrics,
        "training": manifest.training,
        "decode_seconds": round(decode_s, 2),
        "epochs": [{k: round(v, 4) for k, v in row.items()} for row in epochs],
        "confusion": evaluation.confusion if evaluation else None,
        "skipped": [{"path": path, "reason": reason} for path, reason in sorted(skipped)],
    }
    (out / REPORT).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    plot_history(out / HISTORY_PLOT, epochs, int(manifest.training.get("epochs", 0)))
    if evaluation is not None:
        plot_confusion(out / CONFUSION_PLOT, evaluation.confusion, manifest.classes)


def require_matplotlib() -> None:
    """Import matplotlib now: ModuleNotFoundError (``name`` "matplotlib") without the
    ``train`` extra, so a run stops before training rather than at the plots after it."""
    import matplotlib  # noqa: F401


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(path: Path, epochs: list[dict[str, float]], first_phase: int) -> None:
    """Loss and accuracy per epoch, training and validation; a line where fine-tuning began."""
    plt = _pyplot()
    x = [row["epoch"] for row in epochs]
    figure, (loss, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, key in ((loss, "loss"), (accuracy, "accuracy")):
        axes.plot(x, [row.get(key) for row in epochs], marker="o", label="training")
        if any(f"val_{key}" in row for row in epochs):
            axes.plot(x, [row.get(f"val_{key}") for row in epochs], marker="o", label="validation")
        if 0 < first_phase < len(epochs):
            axes.axvline(first_phase + 0.5, color="grey", linestyle="--", label="fine-tuning")
        axes.set_xlabel("epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.set_title(key)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str]) -> None:
    """Validation images by true class (rows) and predicted class (columns)."""
    plt = _pyplot()
    n = len(classes)
    size = max(4.0, 0.5 * n + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(n), classes, rotation=90)
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                axes.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8)
    axes.set_title("validation set")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
