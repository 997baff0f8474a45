"""``batchserve index``: which engine runs the job (the local one here; Ray's in
ray_engine.py). What both write to is outputs.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchserve.bulk.report import BulkReport
    from batchserve.bulk.settings import BulkJob
    from batchserve.bulk.sources import Source


def index_into(
    job: BulkJob,
    sources: Sequence[Source],
    announce: Callable[[int], None] = lambda _already: None,
    progress: Callable[[BulkReport], None] = lambda _report: None,
) -> BulkReport:
    """Run ``batchserve index`` on ``sources`` with the engine the job names; ``announce``
    gets the number of items already in the data dir."""
    if job.bulk.engine == "ray":
        from batchserve.bulk.ray_engine import index_with_ray

        return index_with_ray(job, sources, announce)
    return index_locally(job, sources, announce, progress)


def index_locally(
    job: BulkJob,
    sources: Sequence[Source],
    announce: Callable[[int], None],
    progress: Callable[[BulkReport], None],
) -> BulkReport:
    """The local engine: the model in this process, decode threads beside it."""
    from batchserve.bulk import rerun
    from batchserve.bulk.local import embed_sources
    from batchserve.bulk.outputs import IndexOutput, index_into_output
    from batchserve.bulk.report import BulkReport
    from batchserve.models.loaders import load_model

    already = rerun.unchanged(job, sources)
    if already is not None:  # nothing new: the model is not even loaded
        announce(already)
        return BulkReport(skipped=len(sources))
    model = load_model(job.model)

    def embed(output: IndexOutput) -> BulkReport:
        report = embed_sources(
            sources,
            output,
            model,
            job.batch_sizes,
            job.decode_threads + 1,
            job.images,
            progress=progress,
        )
        if output.store is not None:
            rerun.record(output.store.catalog, job)
        return report

    return index_into_output(job, model.info, announce, embed)
