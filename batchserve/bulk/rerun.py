"""What a re-run of ``batchserve index`` can know without the model: whether every source
is in the data dir already, unchanged, and indexed by the model the job names. Then there
is nothing to embed, and the model (seconds to load) is not loaded at all."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from batchserve.bulk.settings import BulkJob
from batchserve.bulk.sources import Source, read_bytes, sha256_hex
from batchserve.storage.catalog import Catalog
from batchserve.storage.sqlite import SqliteCatalog

#: The catalog's record of the model options the last local index run used.
INDEX_MODEL = "index_model"


def model_key(job: BulkJob) -> str:
    """The job's model options (source, weights, embedding recipe...), as recorded."""
    return json.dumps(dataclasses.asdict(job.model), sort_keys=True, default=str)


def unchanged(job: BulkJob, sources: Sequence[Source]) -> int | None:
    """The items in the data dir when every source is there unchanged (same bytes) and the
    job names the model options of the last run; None when anything may be new (or the job
    writes elsewhere too: a Parquet file, a shared catalog)."""
    if not job.bulk.write_data_dir or job.bulk.output or job.store.shared_catalog:
        return None
    path = Path(job.store.data_dir) / "catalog.sqlite3"
    if not path.exists():
        return None
    catalog = SqliteCatalog(path, dim=0)  # ids, digests and meta: no vector is read
    try:
        if catalog.get_meta(INDEX_MODEL) != model_key(job):
            return None
        known = catalog.digests([s.id for s in sources], job.images.local_features)
        if any(known.get(s.id) is None for s in sources):
            return None
        for source in sources:  # the bytes, as the run itself would read them
            if sha256_hex(read_bytes(source.path)) != known[source.id]:
                return None
        return catalog.count()
    except OSError:
        return None  # a file that cannot be read: the run reports it
    finally:
        catalog.close()


def record(catalog: Catalog, job: BulkJob) -> None:
    """After a run: the model options it used, for the next run to compare."""
    catalog.set_meta(INDEX_MODEL, model_key(job))
