"""The model directory ``batchserve train`` writes and ``load_model`` reads.

``MODEL_DIR/model.keras`` (normalised float pixels in; layers ``embedding`` and
``classifier``), ``labels.txt`` (one class per line, in the head's order) and
``manifest.json``: what the model was built from and how it was trained, and the digest of
``model.keras``, which the loader checks before loading it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchserve.errors import ModelLoadError

FORMAT = "batchserve-trained-model"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
EMBEDDING_LAYER = "embedding"
CLASSIFIER_LAYER = "classifier"


@dataclass
class Manifest:
    name: str
    base: dict[str, Any]  # source, name, weights_sha256 of the backbone
    input_size: tuple[int, int]
    preprocess: str
    embedding_dim: int
    classes: list[str]
    weights_sha256: str  # of model.keras
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    version: int = VERSION

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["input_size"] = list(self.input_size)
        return doc


def is_model_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def write(directory: Path, manifest: Manifest) -> None:
    """Write ``labels.txt`` and ``manifest.json`` beside ``model.keras``."""
    (directory / LABELS_FILE).write_text("".join(c + "\n" for c in manifest.classes), "utf-8")
    text = json.dumps(manifest.as_json(), indent=2, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def read(directory: Path) -> Manifest:
    """The manifest of ``directory``; ModelLoadError if it is not one this version reads."""
    try:
        doc = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {directory / MANIFEST}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelLoadError(f"{directory / MANIFEST} is not a {FORMAT} manifest")
    if doc.get("version") != VERSION:
        raise ModelLoadError(
            f"{directory / MANIFEST} is version {doc.get('version')}; this batchserve reads "
            f"version {VERSION}"
        )
    try:
        size = doc["input_size"]
        return Manifest(
            name=str(doc["name"]),
            base=dict(doc["base"]),
            input_size=(int(size[0]), int(size[1])),
            preprocess=str(doc["preprocess"]),
            embedding_dim=int(doc["embedding_dim"]),
            classes=[str(c) for c in doc["classes"]],
            weights_sha256=str(doc["weights_sha256"]),
            training=dict(doc.get("training", {})),
            metrics=dict(doc.get("metrics", {})),
            created=str(doc.get("created", "")),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelLoadError(f"{directory / MANIFEST} is incomplete: {e!r}") from e
