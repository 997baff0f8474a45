"""``batchserve index``: its engine settings, and which engine runs the job (the local one
here; Ray's in ingest_ray.py). What both write to is index_output.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchserve.config import IndexSettings
    from batchserve.ingest import IngestReport
    from batchserve.sources import Source


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
    from batchserve.index_output import index_into_output
    from batchserve.ingest import ingest
    from batchserve.models import load_model

    model = load_model(settings.model)
    return index_into_output(
        settings,
        model.info,
        announce,
        lambda output: ingest(
            sources,
            output,
            model,
            settings.batching.padded_batch_sizes(),
            settings.server.decode_thread_count() + 1,
            settings.images,
            progress=progress,
        ),
    )
