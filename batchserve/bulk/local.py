"""Bulk indexing with the local engine, and what both engines share: how a source is read
and decoded (as the server decodes an upload) and which sources are new or changed (the
report and the progress line are in report.py).

Files are read and decoded on a thread pool while the model embeds the previous batch;
each batch is one catalog transaction and one index add. A source whose id was indexed from
the same bytes (sha256) is skipped, so an interrupted run resumes where it stopped and a
changed file is indexed again. Unreadable or corrupt files are reported at the end; they do
not stop the run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batchserve.bulk.outputs import IndexOutput
from batchserve.bulk.report import BulkReport
from batchserve.bulk.sources import Source, read_bytes, sha256_hex
from batchserve.errors import BatchserveError
from batchserve.models.batches import pad_batch, padded_size, predicted_class
from batchserve.models.images import DecodeLimits, decode_add_for
from batchserve.models.spec import EmbeddingModel, ModelInfo
from batchserve.storage.records import NewItem


@dataclass(frozen=True)
class Decoded:
    """A source's model input, its thumbnail (JPEG), the digest of its bytes and its
    local features (packed, models/keypoints.py)."""

    pixels: npt.NDArray[np.uint8]
    thumbnail: bytes
    digest: str
    #: uint8 [views, H, W, 3]: its crop views as model input, with ``--crop-views``.
    views: npt.NDArray[np.uint8] | None = None
    features: bytes | None = None


@dataclass(frozen=True)
class Timed:
    """A source loaded on a decode thread: decoded, unchanged (None) or failed (error)."""

    decoded: Decoded | None
    seconds: float
    error: str | None = None


def load_source(
    path: str, known_digest: str | None, info: ModelInfo, limits: DecodeLimits
) -> Decoded | None:
    """Read and decode the file at ``path`` as the server decodes an upload to add for the
    model ``info`` (its input, its views, and a thumbnail), or None when its bytes have
    ``known_digest``: indexed already, unchanged. Raises OSError or BatchserveError for a
    file that cannot be read or decoded."""
    data = read_bytes(path)
    digest = sha256_hex(data)
    if digest == known_digest:
        return None
    item = decode_add_for(data, info, limits)  # one decode for its input, views, thumbnail
    pictures = item.pictures
    views = pictures[1:] if info.views else None
    return Decoded(pictures[0], item.thumbnail, digest, views, item.features)


def load_timed(path: str, known_digest: str | None, info: ModelInfo, limits: DecodeLimits) -> Timed:
    """``load_source`` on a decode thread or task: its outcome, failure included, and the
    seconds it took."""
    began = time.perf_counter()
    try:
        decoded = load_source(path, known_digest, info, limits)
    except (OSError, BatchserveError) as e:
        return Timed(None, time.perf_counter() - began, str(e))
    return Timed(decoded, time.perf_counter() - began)


#: Sources whose digests are looked up in one catalog query, in batches of the largest size.
LOOKUP_BATCHES = 8


def known_digests(
    sources: Iterable[Source], output: IndexOutput, report: BulkReport, batch_size: int
) -> Iterator[tuple[Source, str | None]]:
    """Each source to read with the digest its id was indexed from (None: a new id), looked
    up ``LOOKUP_BATCHES`` batches of ``batch_size`` at a time. Ids present with no digest
    (added through the API or by an older version) are skipped, as their content cannot be
    compared."""
    chunk = batch_size * LOOKUP_BATCHES
    buffer: list[Source] = []

    def flush() -> Iterator[tuple[Source, str | None]]:
        present = output.digests([s.id for s in buffer])
        for s in buffer:
            if s.id in present and present[s.id] is None:
                report.skipped += 1
            else:
                yield s, present.get(s.id)
        buffer.clear()

    for source in sources:
        buffer.append(source)
        if len(buffer) >= chunk:
            yield from flush()
    yield from flush()


def embed_sources(
    sources: Iterable[Source],
    output: IndexOutput,
    model: EmbeddingModel,
    batch_sizes: Sequence[int],
    decode_threads: int,
    limits: DecodeLimits,
    progress: Callable[[BulkReport], None] = lambda _r: None,
) -> BulkReport:
    """The local engine: index every new or changed source into ``output``, decoding on
    ``decode_threads`` threads while the model embeds the previous batch; return what
    happened."""
    report = BulkReport()
    started = time.monotonic()
    largest = batch_sizes[-1]
    embed = _BatchEmbedder(model, batch_sizes, output, report)

    pending = known_digests(sources, output, report, largest)
    with ThreadPoolExecutor(decode_threads, thread_name_prefix="batchserve-bulk") as pool:
        window: deque[tuple[Source, Future[Timed]]] = deque()
        for source, known in pending:
            loading = pool.submit(load_timed, source.path, known, model.info, limits)
            window.append((source, loading))
            # Keep a few batches decoding ahead of the model, no more (bounded memory).
            while len(window) > 4 * largest:
                embed.collect(*window.popleft())
                progress(report)
        while window:
            embed.collect(*window.popleft())
        embed.flush()
    report.seconds = time.monotonic() - started
    progress(report)
    return report


class _BatchEmbedder:
    """Collects decoded sources into batches of the largest size, then embeds and writes
    each batch."""

    def __init__(
        self,
        model: EmbeddingModel,
        batch_sizes: Sequence[int],
        output: IndexOutput,
        report: BulkReport,
    ) -> None:
        self._model = model
        self._batch_sizes = batch_sizes
        self._output = output
        self._report = report
        self._batch: list[tuple[Source, Decoded]] = []

    def collect(self, source: Source, future: Future[Timed]) -> None:
        loaded = future.result()
        self._report.stage_s["read+decode"] += loaded.seconds
        if loaded.error is not None:
            self._report.failed.append((source.path, loaded.error))
            return
        if loaded.decoded is None:
            self._report.skipped += 1
            return
        self._batch.append((source, loaded.decoded))
        if len(self._batch) == self._batch_sizes[-1]:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        began = time.perf_counter()
        embeddings, classes = embed_pixels(
            self._model, [d.pixels for _s, d in batch], self._batch_sizes
        )
        views = embed_views(self._model, [d.views for _s, d in batch], self._batch_sizes)
        wrote = time.perf_counter()
        self._output.write(
            [
                NewItem(s.id, e, s.label, s.metadata, c, d.thumbnail, d.digest, v, d.features)
                for (s, d), e, c, v in zip(batch, embeddings, classes, views, strict=True)
            ]
        )
        self._report.stage_s["embed"] += wrote - began
        self._report.stage_s["write"] += time.perf_counter() - wrote
        self._report.indexed += len(batch)


def embed_pixels(
    model: EmbeddingModel, pixels: Sequence[npt.NDArray[np.uint8]], batch_sizes: Sequence[int]
) -> tuple[npt.NDArray[np.float32], list[str | None]]:
    """Embeddings float32 [N, dim] and predicted classes of N decoded images, run as one
    batch padded to an allowed size (at most the largest)."""
    from batchserve.models.batches import split_outputs

    n = len(pixels)
    outputs = model.predict(pad_batch(list(pixels), padded_size(n, batch_sizes)))
    predictions = split_outputs(outputs, n)
    classes = [predicted_class(p, model.info.classes) for p in predictions]
    return outputs.embeddings[:n], classes


def embed_views(
    model: EmbeddingModel,
    views: Sequence[npt.NDArray[np.uint8] | None],
    batch_sizes: Sequence[int],
) -> list[npt.NDArray[np.float32] | None]:
    """The embeddings [views, dim] of each item's crop views [views, H, W, 3] (None for
    an item without), run in batches of the largest allowed size."""
    pictures = [p for item in views if item is not None for p in item]
    if not pictures:
        return [None] * len(views)
    step = batch_sizes[-1]
    embedded = np.concatenate(
        [
            embed_pixels(model, pictures[start : start + step], batch_sizes)[0]
            for start in range(0, len(pictures), step)
        ]
    )
    out: list[npt.NDArray[np.float32] | None] = []
    taken = 0
    for item in views:
        count = 0 if item is None else len(item)
        out.append(None if item is None else embedded[taken : taken + count])
        taken += count
    return out
