"""The cache of converted models: a model's serving function, converted once into another
runtime's format, kept in a folder named by everything the conversion reads, with the
``ModelInfo`` it serves. A later start finds it from the settings and the source's bytes
alone, before any framework is imported.

``<cache>/<runtime>/<key>/`` holds the runtime's files and ``info.json``; it is written
into a temporary folder and renamed into place, so a folder that exists is whole."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchserve.errors import ModelLoadError
from batchserve.models import model_dir
from batchserve.models.spec import (
    BUILTIN_NAME,
    BUILTIN_SHA256,
    ModelInfo,
    ModelSpec,
    sha256_file,
    sha256_tree,
)

#: Bumped when what the cache holds changes its form.
FORMAT = 1
INFO = "info.json"
#: Settings that change how the model runs but not what it computes.
RUNTIME_ONLY = ("backend", "model_cache", "device", "jit_compile", "intra_op_threads",
                "inter_op_threads")  # fmt: skip


def cache_root(spec: ModelSpec) -> Path:
    """``--model-cache``, else $XDG_CACHE_HOME/batchserve, else ~/.cache/batchserve."""
    if spec.model_cache:
        return Path(spec.model_cache)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchserve"


def source_digest(spec: ModelSpec) -> str:
    """What the model's bytes are, read without loading it: the built-in model's known
    digest, a file's, a trained directory's manifest digest, every file of a SavedModel, or a
    Keras application's name, weights and Keras version."""
    source = spec.source
    if source == BUILTIN_NAME:
        return BUILTIN_SHA256
    if source.startswith("keras:"):
        weights = spec.weights
        if Path(weights).is_file():
            weights = sha256_file(Path(weights))
        return f"{source}:{weights}:keras=={importlib.metadata.version('keras')}"
    path = Path(source)
    if path.is_dir() and model_dir.is_model_dir(path):
        return model_dir.read(path).weights_sha256 + _file_digest(path / model_dir.LABELS_FILE)
    if path.is_dir():
        return sha256_tree(path)
    if path.is_file():
        return sha256_file(path)
    raise ModelLoadError(f"--model {source!r}: no such file or directory")


def _file_digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else ""


def cache_key(spec: ModelSpec, runtime: str) -> str:
    """The name of ``spec``'s converted model for ``runtime`` (e.g. ``openvino==2026.4.1``):
    a digest of the source's bytes, the labels file and every setting that shapes the
    serving function."""
    shaping = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RUNTIME_ONLY}
    labels = _file_digest(Path(spec.labels_file)) if spec.labels_file else ""
    made_of = [FORMAT, runtime, source_digest(spec), labels, shaping]
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:32]


def cached(folder: Path) -> ModelInfo | None:
    """The info of the converted model in ``folder``, or None when there is none."""
    try:
        fields = json.loads((folder / INFO).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / INFO} cannot be read ({e}): remove {folder}") from e
    fields["input_size"] = tuple(fields["input_size"])
    return ModelInfo(**fields)


def store(folder: Path, info: ModelInfo, write: Callable[[Path], Any]) -> None:
    """Put a converted model in ``folder``: ``write(tmp)`` writes the runtime's files into a
    temporary folder beside it, ``info.json`` follows, and the folder is renamed into place
    (another process that got there first wins; its copy is the same)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        (tmp / INFO).write_text(json.dumps(dataclasses.asdict(info), indent=1), "utf-8")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / INFO).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
