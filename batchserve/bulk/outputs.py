"""Where a bulk index puts what it embeds: the data dir's item store, a Parquet file of
(id, label, metadata, class, embedding) for other tools, or both."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore

if TYPE_CHECKING:
    from batchserve.bulk.report import BulkReport
    from batchserve.bulk.settings import BulkJob
    from batchserve.models.spec import ModelInfo


class EmbeddingsFile:
    """A Parquet file written a batch at a time: ``id``, ``label``, ``metadata`` (JSON
    text), ``class`` (predicted) and ``embedding`` (float32, fixed size ``dim``). Written to
    a temporary name and renamed on ``close``, so a reader never sees half a file."""

    def __init__(self, path: Path, dim: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self.rows = 0
        self._partial = path.with_name(f".{path.name}.partial")
        self._schema = pa.schema(
            [
                ("id", pa.string()),
                ("label", pa.string()),
                ("metadata", pa.string()),
                ("class", pa.string()),
                ("embedding", pa.list_(pa.float32(), dim)),
            ]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self._partial, self._schema)

    def write(self, items: Sequence[NewItem]) -> None:
        import pyarrow as pa

        vectors = np.stack([item.embedding for item in items]).astype(np.float32, copy=False)
        columns = [
            pa.array([item.id for item in items], pa.string()),
            pa.array([item.label for item in items], pa.string()),
            pa.array([json.dumps(item.metadata) for item in items], pa.string()),
            pa.array([item.predicted_class for item in items], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        ]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema))
        self.rows += len(items)

    def close(self) -> None:
        self._writer.close()
        os.replace(self._partial, self.path)


class IndexOutput:
    """The store (None: ``--no-write-data-dir``) and the Parquet file (None: no
    ``--output``) a bulk index writes each batch to."""

    def __init__(
        self,
        store: ItemStore | None,
        parquet: EmbeddingsFile | None = None,
        with_features: bool = True,
    ) -> None:
        self.store = store
        self.parquet = parquet
        #: The run finds local features: items stored without them are indexed again.
        self.with_features = with_features

    def digests(self, item_ids: Sequence[str]) -> dict[str, Any]:
        """What the catalog knows of ``item_ids`` (none without a store)."""
        if self.store is None:
            return {}
        return self.store.catalog.digests(item_ids, self.with_features)

    def write(self, items: Sequence[NewItem]) -> None:
        """One batch: one catalog transaction and index add, and one Parquet row group."""
        if not items:
            return
        if self.store is not None:
            self.store.add(items)
        if self.parquet is not None:
            self.parquet.write(items)

    def finish(self) -> None:
        """Compact and snapshot the index; complete the Parquet file."""
        if self.store is not None:
            self.store.maintain()
            self.store.snapshot()
        if self.parquet is not None:
            self.parquet.close()


def open_output(job: BulkJob, info: ModelInfo) -> IndexOutput:
    """The store of the job's data dir (which refuses another model's catalog) and the
    Parquet file, as the job asks."""
    from batchserve.storage.store import open_store

    store = None
    if job.bulk.write_data_dir:
        store = open_store(job.store, job.index, info)
        store.open()
    parquet = EmbeddingsFile(Path(job.bulk.output), info.dim) if job.bulk.output else None
    return IndexOutput(store, parquet, job.images.local_features)


def finish(output: IndexOutput, report: BulkReport) -> None:
    """Compact and snapshot the index, complete the Parquet file: the ``index`` stage."""
    began = time.perf_counter()
    output.finish()
    report.stage_s["index"] += time.perf_counter() - began


def close(output: IndexOutput) -> None:
    if output.store is not None:
        output.store.close()


def index_into_output(
    job: BulkJob,
    info: ModelInfo,
    announce: Callable[[int], None],
    embed: Callable[[IndexOutput], BulkReport],
) -> BulkReport:
    """What both engines do around their work: open the job's outputs for ``info``'s
    embeddings (``announce`` gets the items there already), run ``embed`` into them, compact
    and snapshot, close. The report's seconds run from the start of ``embed`` to the
    snapshot."""
    output = open_output(job, info)
    try:
        announce(0 if output.store is None else output.store.index.size)
        began = time.monotonic()
        report = embed(output)
        finish(output, report)
        report.seconds = time.monotonic() - began
    finally:
        close(output)
    return report
