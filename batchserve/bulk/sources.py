"""What ``batchserve index`` reads: the images of a folder tree (labels from class folders)
or the rows of a manifest (CSV, JSON lines or Parquet of path, id, label, metadata).

A location is a local path or a URI of any filesystem pyarrow reads (``s3://``, ``gs://``,
``hdfs://``, ``file://``); manifest paths are relative to the manifest's folder unless they
are absolute or URIs. Both engines read sources through this module, so they index the same
ids and labels from the same files.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import posixpath
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.storage.records import check_id, check_label, check_metadata

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class Source:
    """One image to index: ``path`` is a local path or a URI."""

    path: str
    id: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def is_uri(location: str) -> bool:
    return "://" in location


@functools.lru_cache(maxsize=8)
def _filesystem_of(scheme_and_host: str) -> Any:
    from pyarrow import fs

    return fs.FileSystem.from_uri(scheme_and_host + "/")[0]


#: Schemes whose path within the filesystem is the URI without its scheme (bucket/key).
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})


def _remote(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) of a URI: one filesystem per scheme and host,
    made once (an S3 or GCS client resolves credentials and region when it is made: not
    per file)."""
    from pyarrow import fs

    scheme, _, rest = location.partition("://")
    if scheme == "file":
        return fs.LocalFileSystem(), "/" + rest.lstrip("/")
    host, _, _path = rest.partition("/")
    filesystem = _filesystem_of(f"{scheme}://{host}")
    if scheme in _BUCKET_SCHEMES:
        return filesystem, rest
    return filesystem, urllib.parse.urlsplit(location).path


def read_bytes(location: str) -> bytes:
    """The whole file at ``location``. Raises OSError when it cannot be read."""
    if not is_uri(location):
        return Path(location).read_bytes()
    filesystem, path = _remote(location)
    with filesystem.open_input_stream(path) as f:
        return bytes(f.read())


def sha256_hex(data: bytes) -> str:
    """The content digest a catalog keeps of each indexed file."""
    return hashlib.sha256(data).hexdigest()


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES


def scan_directory(root: str) -> Iterator[Source]:
    """Every image under ``root``, sorted; its id is the path relative to ``root`` and its
    label the top-level sub-folder (class folders), or none for files in ``root``."""
    for location, relative in sorted(_tree(root), key=lambda pair: pair[1]):
        parts = relative.split("/")
        yield Source(location, relative, parts[0] if len(parts) > 1 else None)


def _tree(root: str) -> Iterator[tuple[str, str]]:
    """(location, path relative to ``root`` with / separators) of every image file under
    it (by suffix, checked before the file is)."""
    if not is_uri(root):
        base = Path(root)
        for path in base.rglob("*"):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                yield str(path), path.relative_to(base).as_posix()
        return
    from pyarrow import fs

    filesystem, inside = _remote(root)
    prefix = root.rstrip("/") + "/"
    for info in filesystem.get_file_info(fs.FileSelector(inside, recursive=True)):
        if info.type == fs.FileType.File and _is_image(info.path):
            relative = posixpath.relpath(info.path, inside.rstrip("/") or "/")
            yield prefix + relative, relative


def read_manifest(manifest: str) -> Iterator[Source]:
    """Rows of a CSV (header: path, id, label, metadata), JSON lines or Parquet manifest;
    relative paths are relative to the manifest's folder; id defaults to the path."""
    suffix = posixpath.splitext(manifest)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InvalidInput(f"manifest {manifest} must be .csv, .jsonl or .parquet")
    data = read_bytes(manifest)
    try:
        rows = _rows(suffix, data)
    except (ValueError, AttributeError) as e:  # UnicodeDecodeError and JSON errors included
        raise InvalidInput(f"manifest {manifest} cannot be read: {e}") from e
    folder = manifest.rsplit("/", 1)[0] if is_uri(manifest) else str(Path(manifest).parent)
    for n, row in enumerate(rows, start=1):
        yield _manifest_row(manifest, n, row, folder)


def _rows(suffix: str, data: bytes) -> list[dict[str, Any]]:
    """The rows of a manifest's bytes, each a dict of its columns."""
    if suffix == ".parquet":
        return _parquet_rows(data)
    text = data.decode("utf-8")
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"line {n} is not a JSON object")
    return rows


def _parquet_rows(data: bytes) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # ParquetFile.read, not read_table: read_table's thread pool can abort the interpreter at
    # exit (apache/arrow#33975); this path was clean in 40 of 40 runs.
    table = pq.ParquetFile(pa.BufferReader(data)).read()
    rows: list[dict[str, Any]] = table.to_pylist()
    if "metadata" in table.column_names and pa.types.is_struct(table.schema.field("metadata").type):
        # A struct column holds the union of every row's keys: drop those a row lacks.
        for row in rows:
            if row["metadata"] is not None:
                row["metadata"] = {k: v for k, v in row["metadata"].items() if v is not None}
    return rows


def _manifest_row(manifest: str, n: int, row: dict[str, Any], folder: str) -> Source:
    path = row.get("path")
    if not path:
        raise InvalidInput(f"{manifest} row {n} has no path")
    path = str(path)
    given = row.get("id")
    try:
        return Source(
            _beside(folder, path),
            check_id(path if given is None or given == "" else str(given)),
            check_label(row.get("label")),
            check_metadata(row.get("metadata")),
        )
    except (InvalidInput, PayloadTooLarge) as e:
        raise type(e)(f"{manifest} row {n}: {e}") from e


def _beside(folder: str, path: str) -> str:
    if is_uri(path) or posixpath.isabs(path):
        return path
    return f"{folder}/{path}" if is_uri(folder) else str(Path(folder) / path)


def sources_for(location: str) -> Iterator[Source]:
    """The sources of a folder tree or a manifest file, local or at a URI."""
    if posixpath.splitext(location)[1].lower() in MANIFEST_SUFFIXES:
        return read_manifest(location)
    if is_uri(location) or Path(location).is_dir():
        return scan_directory(location)
    if Path(location).is_file():
        raise InvalidInput(f"manifest {location} must be .csv, .jsonl or .parquet")
    raise InvalidInput(f"{location} is neither a directory nor a manifest file")
