"""``batchserve index``: its engine settings, and which engine runs the job (the local one
here; Ray's in ingest_ray.py). What both write to is index_output.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchserve.bulk.report import BulkReport
    from batchserve.bulk.sources import Source
    from batchserve.config import IndexSettings


def index_into(
    settings: IndexSettings,
    sources: Sequence[Source],
    announce: Callable[[int], None] = lambda _already: None,
    progress: Callable[[BulkReport], None] = lambda _report: None,
) -> BulkReport:
    """Run ``batchserve index`` on ``sources`` with the engine the settings name;
    ``announce`` gets the number of items already in the data dir."""
    if settings.bulk.engine == "ray":
        from batchserve.bulk.ray_engine import index_with_ray

        return index_with_ray(settings, sources, announce)
    return index_locally(settings, sources, announce, progress)


def index_locally(
    settings: IndexSettings,
    sources: Sequence[Source],
    announce: Callable[[int], None],
    progress: Callable[[BulkReport], None],
) -> BulkReport:
    """The local engine: the model in this process, decode threads beside it."""
    from batchserve.bulk.local import ingest
    from batchserve.bulk.outputs import index_into_output
    from batchserve.models.loaders import load_model

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
