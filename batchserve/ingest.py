"""Bulk indexing: a directory tree (labels from class folders) or a manifest (CSV or JSONL
of path, id, label, metadata) into the data dir, with the server's own model and store.

Files are read and decoded on a thread pool while the model embeds the previous batch;
each batch is one catalog transaction and one index add. Ids already in the catalog are
skipped, so an interrupted run resumes where it stopped. Unreadable or corrupt files are
reported at the end; they do not stop the run.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from batchserve.catalog import NewItem
from batchserve.errors import BatchserveError, InvalidInput
from batchserve.images import DecodeLimits, decode_image, make_thumbnail
from batchserve.inference import pad_batch, padded_size
from batchserve.inputs import check_id, check_label, check_metadata
from batchserve.models import EmbeddingModel
from batchserve.pipeline import predicted_class
from batchserve.store import ItemStore

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})


@dataclass(frozen=True)
class Source:
    """One image to index."""

    path: Path
    id: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decoded:
    """A source's model input and its thumbnail (JPEG)."""

    pixels: npt.NDArray[np.uint8]
    thumbnail: bytes


@dataclass
class IngestReport:
    indexed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0


def scan_directory(root: Path) -> Iterator[Source]:
    """Every image under ``root``, sorted; its id is the path relative to ``root`` and its
    label the top-level sub-folder (class folders), or none for files in ``root``."""
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(root)
        label = relative.parts[0] if len(relative.parts) > 1 else None
        yield Source(path, relative.as_posix(), label)


def read_manifest(manifest: Path) -> Iterator[Source]:
    """Rows of a CSV (header: path, id, label, metadata) or JSONL manifest; paths are
    relative to the manifest's folder; id defaults to the path."""
    base = manifest.parent
    rows: Iterable[dict[str, Any]]
    with open(manifest, newline="", encoding="utf-8") as f:
        if manifest.suffix.lower() == ".csv":
            rows = list(csv.DictReader(f))
        elif manifest.suffix.lower() in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            raise InvalidInput(f"manifest {manifest} must be .csv or .jsonl")
    for n, row in enumerate(rows, start=1):
        if not row.get("path"):
            raise InvalidInput(f"{manifest} row {n} has no path")
        path = base / str(row["path"])
        yield Source(
            path,
            check_id(row.get("id") or str(row["path"])),
            check_label(row.get("label")),
            check_metadata(row.get("metadata")),
        )


def sources_for(path: Path) -> Iterator[Source]:
    if path.is_dir():
        return scan_directory(path)
    if path.is_file():
        return read_manifest(path)
    raise InvalidInput(f"{path} is neither a directory nor a manifest file")


class Progress:
    """A one-line progress report with images/s, redrawn at most twice a second."""

    def __init__(self, out: TextIO, total: int | None) -> None:
        self._out = out
        self._total = total
        self._started = time.monotonic()
        self._shown = 0.0

    def update(self, report: IngestReport, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._shown < 0.5:
            return
        self._shown = now
        rate = report.indexed / max(now - self._started, 1e-9)
        done = report.indexed + report.skipped + len(report.failed)
        total = f"/{self._total}" if self._total else ""
        self._out.write(
            f"\r{done}{total} files: {report.indexed} indexed, {report.skipped} already "
            f"present, {len(report.failed)} failed, {rate:.0f} images/s"
        )
        self._out.flush()


def ingest(
    sources: Iterable[Source],
    store: ItemStore,
    model: EmbeddingModel,
    batch_sizes: list[int],
    decode_threads: int,
    limits: DecodeLimits,
    progress: Callable[[IngestReport], None] = lambda _r: None,
) -> IngestReport:
    """Index every source not yet in ``store``; return what happened."""
    report = IngestReport()
    started = time.monotonic()
    size = model.info.input_size
    largest = batch_sizes[-1]
    classes = model.info.classes

    def load(source: Source) -> Decoded:
        data = source.path.read_bytes()
        return Decoded(decode_image(data, size, limits), make_thumbnail(data, limits))

    pending = _new_sources(sources, store, report, largest)
    with ThreadPoolExecutor(decode_threads, thread_name_prefix="batchserve-ingest") as pool:
        window: deque[tuple[Source, Future[Decoded]]] = deque()
        batch: list[tuple[Source, Decoded]] = []
        for source in pending:
            window.append((source, pool.submit(load, source)))
            # Keep a few batches decoding ahead of the model, no more (bounded memory).
            while len(window) > 4 * largest:
                _collect(window.popleft(), batch, report)
                if len(batch) == largest:
                    _embed_and_store(batch, store, model, batch_sizes, classes, report)
                    progress(report)
        while window:
            _collect(window.popleft(), batch, report)
            if len(batch) == largest:
                _embed_and_store(batch, store, model, batch_sizes, classes, report)
                progress(report)
        if batch:
            _embed_and_store(batch, store, model, batch_sizes, classes, report)
    report.seconds = time.monotonic() - started
    progress(report)
    return report


def _new_sources(
    sources: Iterable[Source], store: ItemStore, report: IngestReport, chunk: int
) -> Iterator[Source]:
    """The sources whose ids are not in the catalog yet (checked a chunk at a time)."""
    buffer: list[Source] = []

    def flush() -> Iterator[Source]:
        present = store.catalog.ids([s.id for s in buffer])
        report.skipped += len(present)
        yield from (s for s in buffer if s.id not in present)
        buffer.clear()

    for source in sources:
        buffer.append(source)
        if len(buffer) >= chunk * 8:
            yield from flush()
    yield from flush()


def _collect(
    entry: tuple[Source, Future[Decoded]],
    batch: list[tuple[Source, Decoded]],
    report: IngestReport,
) -> None:
    source, future = entry
    try:
        batch.append((source, future.result()))
    except (OSError, BatchserveError) as e:
        report.failed.append((str(source.path), str(e)))


def _embed_and_store(
    batch: list[tuple[Source, Decoded]],
    store: ItemStore,
    model: EmbeddingModel,
    batch_sizes: list[int],
    classes: list[str] | None,
    report: IngestReport,
) -> None:
    from batchserve.inference import split_outputs

    n = len(batch)
    outputs = model.predict(pad_batch([d.pixels for _s, d in batch], padded_size(n, batch_sizes)))
    predictions = split_outputs(outputs, n)
    store.add(
        [
            NewItem(
                s.id, p.embedding, s.label, s.metadata, predicted_class(p, classes), d.thumbnail
            )
            for (s, d), p in zip(batch, predictions, strict=True)
        ]
    )
    report.indexed += n
    batch.clear()


def print_summary(report: IngestReport, out: TextIO = sys.stderr, limit: int = 20) -> None:
    out.write(
        f"\nindexed {report.indexed} images in {report.seconds:.1f} s "
        f"({report.images_per_s:.0f} images/s); {report.skipped} already present; "
        f"{len(report.failed)} failed\n"
    )
    for path, reason in report.failed[:limit]:
        out.write(f"  failed: {path}: {reason}\n")
    if len(report.failed) > limit:
        out.write(f"  ... and {len(report.failed) - limit} more\n")
