"""``batchserve index``: which engine runs the job, and what both engines share around it:
the model check against the catalog, the outputs (data dir and/or Parquet file), and the
final compaction and snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchserve.errors import ConfigError
from batchserve.settings import setting

if TYPE_CHECKING:
    from batchserve.config import IndexSettings
    from batchserve.index_output import IndexOutput
    from batchserve.ingest import IngestReport
    from batchserve.models import ModelInfo
    from batchserve.sources import Source


@dataclass(frozen=True)
class EngineSettings:
    """Which engine embeds the images, and where the embeddings go."""

    engine: str = setting(
        "local",
        "'local': decode threads and the model in this process; 'ray': Ray Data, decode "
        "tasks and an actor pool holding the model, on this machine or a cluster "
        "(pip install 'batchserve[ray]')",
        choices=("local", "ray"),
    )
    output: str = setting(
        "", "also write (id, label, metadata, class, embedding) of each image to this Parquet file"
    )
    write_data_dir: bool = setting(
        True, "store the items in --data-dir and snapshot its index (off: only --output)"
    )
    report: str = setting("", "also write the final report to this JSON file")

    def __post_init__(self) -> None:
        if not self.write_data_dir and not self.output:
            raise ConfigError("--no-write-data-dir needs --output PATH.parquet: nothing to write")
        if self.output and not self.output.endswith(".parquet"):
            raise ConfigError(f"output must be a .parquet file, got {self.output!r}")


def open_output(settings: IndexSettings, info: ModelInfo) -> IndexOutput:
    """The store of ``settings``' data dir (which refuses another model's catalog) and the
    Parquet file, as the settings ask."""
    from batchserve.index_output import EmbeddingsFile, IndexOutput
    from batchserve.server import open_store

    store = None
    if settings.bulk.write_data_dir:
        store = open_store(settings.store, settings.index, info)
        store.open()
    parquet = EmbeddingsFile(Path(settings.bulk.output), info.dim) if settings.bulk.output else None
    return IndexOutput(store, parquet)


def finish(output: IndexOutput, report: IngestReport) -> None:
    """Compact and snapshot the index, complete the Parquet file: the ``index`` stage."""
    began = time.perf_counter()
    output.finish()
    report.stage_s["index"] += time.perf_counter() - began


def close(output: IndexOutput) -> None:
    if output.store is not None:
        output.store.close()


def index_into(
    settings: IndexSettings,
    sources: Sequence[Source],
    announce: Callable[[int], None] = lambda _already: None,
    progress: Callable[[IngestReport], None] = lambda _report: None,
) -> IngestReport:
    """Run ``batchserve index`` on ``sources`` with the engine the settings name;
    ``announce`` gets the number of items already in the data dir."""
    if settings.bulk.engine == "ray":
        from batchserve.ingest_ray import index_with_ray

        return index_with_ray(settings, sources, announce)
    return index_locally(settings, sources, announce, progress)


def index_locally(
    settings: IndexSettings,
    sources: Sequence[Source],
    announce: Callable[[int], None],
    progress: Callable[[IngestReport], None],
) -> IngestReport:
    """The local engine: the model in this process, decode threads beside it."""
    from batchserve.ingest import ingest
    from batchserve.models import load_model

    model = load_model(settings.model)
    output = open_output(settings, model.info)
    try:
        announce(0 if output.store is None else output.store.index.size)
        began = time.monotonic()
        report = ingest(
            sources,
            output,
            model,
            settings.batching.padded_batch_sizes(),
            settings.server.decode_thread_count() + 1,
            settings.images,
            progress=progress,
        )
        finish(output, report)
        report.seconds = time.monotonic() - began
    finally:
        close(output)
    return report
