"""The cache of converted models: a model's serving function, converted once into another
runtime's format, kept in a folder named by everything the conversion reads (the source's
bytes, the labels, the settings that shape the function, the runtime's version, and
batchserve's own code that builds the function), with the ``ModelInfo`` it serves. A later
start finds it from these alone, before any framework is imported.

``<cache>/<runtime>/<key>/`` holds the runtime's files, ``info.json`` and ``files.json``
(each file's digest, checked at every start: a file cut short or zeroed on a crashed disk
is refused, not served). It is written into a temporary folder, synced, and renamed into
place, so a folder that exists is whole."""

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

from batchserve import __version__
from batchserve.errors import ModelLoadError
from batchserve.models.spec import (
    BUILTIN_NAME,
    BUILTIN_SHA256,
    ModelInfo,
    ModelSpec,
    sha256_file,
    sha256_tree,
)

#: Bumped when what the cache holds changes its form.
FORMAT = 2
INFO = "info.json"
#: Each of the runtime's files with its sha256.
DIGESTS = "files.json"
#: batchserve's code that builds the serving function: the models package.
CODE = Path(__file__).parent
#: Settings that change how the model runs but not what it computes.
RUNTIME_ONLY = ("backend", "model_cache", "device", "jit_compile", "intra_op_threads",
                "inter_op_threads", "precision")  # fmt: skip


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
        return f"{source}:{weights}:keras=={_keras_version()}"
    path = Path(source)
    if path.is_dir():  # a trained model's folder (manifest, model, labels) or a SavedModel
        return sha256_tree(path)
    if path.is_file():
        return sha256_file(path)
    raise ModelLoadError(f"--model {source!r}: no such file or directory")


def _keras_version() -> str:
    try:
        return importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            "a keras: model needs Keras to find its converted copy: install the cpu extra"
        ) from e


def code_digest() -> str:
    """batchserve's version and the models package's source: what builds the function."""
    files = sorted(CODE.glob("*.py"))
    return hashlib.sha256(
        b"".join(f.read_bytes() for f in files) + __version__.encode()
    ).hexdigest()


def _file_digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else ""


def cache_key(spec: ModelSpec, runtime: str) -> str:
    """The name of ``spec``'s converted model for ``runtime`` (e.g. ``openvino==2026.4.1``):
    a digest of the source's bytes, the labels file, every setting but those that only
    say how it runs (``RUNTIME_ONLY``), and the code that builds the function."""
    shaping = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RUNTIME_ONLY}
    labels = _file_digest(Path(spec.labels_file)) if spec.labels_file else ""
    made_of = [FORMAT, runtime, source_digest(spec), labels, shaping, code_digest()]
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:32]


def cached(folder: Path) -> ModelInfo | None:
    """The info of the converted model in ``folder``, or None when there is none; its files
    checked against their digests."""
    try:
        fields = json.loads((folder / INFO).read_text("utf-8"))
        digests = json.loads((folder / DIGESTS).read_text("utf-8"))
        fields["input_size"] = tuple(fields["input_size"])
        info = ModelInfo(**fields)
    except FileNotFoundError:
        if folder.exists():
            raise unusable(folder, "it is not whole") from None
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise unusable(folder, f"it cannot be read: {e}") from e
    for name, digest in digests.items():
        if _file_digest(folder / name) != digest:
            raise unusable(folder, f"{name} is not the file that was written")
    return info


def unusable(folder: Path, why: str) -> ModelLoadError:
    """A converted model that cannot be served, and the way out."""
    return ModelLoadError(f"the converted model in {folder} cannot be used ({why}): remove it")


def store(folder: Path, info: ModelInfo, write: Callable[[Path], Any]) -> None:
    """Put a converted model in ``folder``: ``write(tmp)`` writes the runtime's files into a
    temporary folder beside it, ``info.json`` follows, and the folder is renamed into place
    (another process that got there first wins; its copy is the same)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / DIGESTS).write_text(json.dumps(digests, indent=1), "utf-8")
        (tmp / INFO).write_text(json.dumps(dataclasses.asdict(info), indent=1), "utf-8")
        for written in [*tmp.iterdir(), tmp]:
            _sync(written)
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep other users from the shared cache
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / INFO).is_file():
                raise
        _sync(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
