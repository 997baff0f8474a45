"""The settings of one ``batchserve train`` run (the command's flags, checked)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchserve.models.images import DecodeLimits
from batchserve.models.spec import ModelSpec
from batchserve.settings import part, setting


@dataclass(frozen=True)
class TrainSettings:
    """``batchserve train DATA_DIR --out MODEL_DIR``: the base model and how to train on it."""

    data_dir: Path
    out: Path
    model: ModelSpec = part(
        ModelSpec,
        only=(
            "model",
            "weights",
            "input_size",
            "preprocess",
            "intra_op_threads",
            "fit",
            "trim_borders",
        ),
    )
    images: DecodeLimits = part(DecodeLimits, only=("max_image_pixels",))
    name: str = setting("", "model name (default: MODEL_DIR's name)")
    embedding_dim: int = setting(256, "size of the new embedding", at_least=1)
    dropout: float = setting(0.2, "dropout after the embedding", at_least=0, at_most=0.99)
    epochs: int = setting(10, "epochs with the backbone frozen", at_least=1)
    batch_size: int = setting(32, "images per training step", at_least=1)
    learning_rate: float = setting(1e-3, "Adam's learning rate", above=0)
    val_split: float = setting(0.1, "share of each class held out", at_least=0, at_most=0.9)
    unfreeze_top: int = setting(
        0,
        "then fine-tune the top N backbone layers (batch norm stays frozen); 0: no",
        at_least=0,
    )
    fine_tune_epochs: int = setting(0, "0: as many as epochs", at_least=0)
    fine_tune_learning_rate: float = setting(0.0, "0: learning_rate / 10", at_least=0)
    augment: bool = setting(True, "random flip, rotation, zoom and contrast while training")
    patience: int = setting(3, "early stopping: epochs without gain", at_least=1)
    seed: int = setting(0, "seed of the split, the shuffles and the new layers")
    cache_file: str = setting("", "cache decoded images in this file (default: memory)")

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
