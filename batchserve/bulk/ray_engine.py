"""Bulk indexing on Ray Data (``batchserve index --engine ray``): the local engine's job,
spread over the CPUs and GPUs of a Ray cluster, or of this machine.

    sources (driver) → read + decode (CPU tasks, the server's decoder)
        → embed (an actor pool: one model per actor, one GPU each when the cluster has GPUs)
        → write (the driver: one catalog transaction and index add per batch, Parquet)
        → compact and snapshot the index (driver)

Ray streams between the stages with backpressure, so memory stays bounded whatever the
number of images. The driver learns the model's fingerprint from one Ray task before the
job (and refuses a catalog of another model); every actor checks its own model against it,
so a node with other weights fails the job instead of mixing embeddings.

Ray is imported only here, and only when this engine runs (the ``ray`` extra).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from batchserve.bulk import ray_stages
from batchserve.bulk.outputs import IndexOutput
from batchserve.bulk.ray_stages import item_of
from batchserve.errors import BatchserveError, ConfigError
from batchserve.models.compiled import QUIET_TENSORFLOW

if TYPE_CHECKING:
    from batchserve.bulk.report import BulkReport
    from batchserve.bulk.settings import BulkJob, RaySettings
    from batchserve.bulk.sources import Source
    from batchserve.models.spec import ModelInfo
    from batchserve.storage.data_dir import StoreSettings

INSTALL_HINT = "--engine ray needs Ray: pip install 'batchserve[ray]'"

#: Memory reserved per model actor: TensorFlow, the model and a batch of activations.
ACTOR_MEMORY_BYTES = 2 << 30

#: Rows per block of the source table, and per decode task.
_ROWS_PER_BLOCK = 64
_DECODE_BATCH = 16


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return ray


def index_with_ray(
    job: BulkJob, sources: Sequence[Source], announce: Callable[[int], None]
) -> BulkReport:
    """Run the job on Ray; the same report as the local engine's."""
    from batchserve.bulk.outputs import index_into_output

    ray = import_ray()
    connect(ray, job.ray)
    try:
        info = ray.get(_remote_model_info(ray).remote(job.model))
        return index_into_output(
            job, info, announce, lambda output: _run(ray, job, info, sources, output)
        )
    except ray.exceptions.RayTaskError as e:
        raise _domain_error(e) from e
    finally:
        ray.shutdown()


def connect(ray: Any, settings: RaySettings) -> None:
    """Join the cluster at ``ray_address``, or start one on this machine.

    Ray 2.59 and later turn token authentication on for a cluster they start: this run's
    own cluster gets a token (``~/.ray/auth_token``, made once); to join a cluster, run
    with the environment its nodes run with (``RAY_AUTH_MODE=token`` and the token in
    ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``), as Ray's documentation says.
    """
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": "warning",
        "runtime_env": {"env_vars": {**QUIET_TENSORFLOW, "OMP_WAIT_POLICY": "PASSIVE"}},
    }
    if settings.ray_address:
        options["address"] = settings.ray_address
    elif settings.ray_cpus:
        options["num_cpus"] = settings.ray_cpus
    try:
        ray.init(**options)
    except ray.exceptions.AuthenticationError as e:
        raise ConfigError(
            f"Ray at {settings.ray_address or 'this machine'} refused this run's token: {e}. "
            "Run with the cluster's RAY_AUTH_MODE and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
        ) from e
    except ConnectionError as e:
        raise ConfigError(
            f"cannot reach Ray at {settings.ray_address!r}: {e} (a cluster with token "
            "authentication takes only clients run with its RAY_AUTH_MODE=token and its "
            "token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        ) from e


def _remote_model_info(ray: Any) -> Any:
    return ray.remote(num_cpus=1)(ray_stages.model_info)


def _domain_error(error: Any) -> Exception:
    """The batchserve error that failed a Ray task (a model mismatch on a node, say), or
    the Ray error itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BatchserveError) else error


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and the Ray resources each one holds."""

    actors: int
    num_cpus: int
    num_gpus: int


def plan_actors(wanted: int, cluster: dict[str, float]) -> ActorPlan:
    """The actor pool for a cluster with ``cluster`` resources (``ray.cluster_resources()``):
    one GPU per actor when there are GPUs, else one CPU each; never every CPU, so the
    decode tasks always have some. Raises ConfigError for a pool that does not fit."""
    cpus, gpus = int(cluster.get("CPU", 0)), int(cluster.get("GPU", 0))
    if gpus:
        actors = wanted or gpus
        if actors > gpus:
            raise ConfigError(f"--ray-actors {actors}: the cluster has {gpus} GPUs")
        plan = ActorPlan(actors, 1, 1)
    else:
        actors = wanted or max(1, cpus // 2)
        plan = ActorPlan(actors, 1, 0)
    if plan.actors * plan.num_cpus >= cpus:
        fewer = f"use --ray-actors {cpus - 1} or fewer, or " if cpus > 1 else "use "
        raise ConfigError(
            f"{plan.actors} model actors of {plan.num_cpus} CPU would take all {cpus} CPUs of "
            f"the Ray cluster and leave none to decode: {fewer}a cluster with more CPUs"
        )
    return plan


def _run(
    ray: Any,
    job: BulkJob,
    info: ModelInfo,
    sources: Sequence[Source],
    output: IndexOutput,
) -> BulkReport:
    from batchserve.bulk.local import known_digests
    from batchserve.bulk.report import BulkReport

    report = BulkReport()
    pending = list(known_digests(sources, output, report, job.batch_sizes[-1]))
    if not pending:
        return report
    plan = plan_actors(job.ray.ray_actors, ray.cluster_resources())
    dataset = _pipeline(ray, job, info, pending, plan)
    writers = output.store is not None and job.store.shared_catalog
    if writers:
        dataset = _with_catalog_writers(ray, dataset, job.store, info, plan)
    # What the driver writes: everything, or only the Parquet file when the writer actors
    # store the rows in the catalog.
    sink = IndexOutput(None, output.parquet) if writers else output
    nodes: set[str] = set()
    for batch in dataset.iter_batches(batch_size=job.batch_sizes[-1], batch_format="numpy"):
        _write(batch, sink, report, nodes)
    if writers and output.store is not None:
        began = time.perf_counter()
        output.store.catch_up()  # the writers' items, from the catalog's change log
        report.stage_s["index"] += time.perf_counter() - began
    report.nodes = max(len(nodes), 1)
    return report


def _with_catalog_writers(
    ray: Any, dataset: Any, store: StoreSettings, info: ModelInfo, plan: ActorPlan
) -> Any:
    """A PostgreSQL catalog takes writes from several processes at once (row locks per id,
    one lock for the change log's order): a pool of writer actors, one connection each,
    instead of the driver alone. They wait on the network, so they hold no CPU."""
    return dataset.map_batches(
        ray_stages.WriteRows,
        fn_constructor_kwargs={"store": store, "dim": info.dim, "views": info.views},
        compute=ray.data.ActorPoolStrategy(size=min(4, 2 * plan.actors)),
        batch_size=None,
        batch_format="numpy",
        num_cpus=0,
    )


def _pipeline(
    ray: Any,
    job: BulkJob,
    info: ModelInfo,
    pending: list[tuple[Source, str | None]],
    plan: ActorPlan,
) -> Any:
    """The Ray Dataset: source blocks → decode tasks → embedding actors."""
    import pyarrow as pa

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # fids follow the sources, as locally
    table = pa.table(
        {
            "path": [s.path for s, _known in pending],
            "id": [s.id for s, _known in pending],
            "label": [s.label for s, _known in pending],
            "metadata": [json.dumps(s.metadata) for s, _known in pending],
            "known": [known for _s, known in pending],
        }
    )
    blocks = [table.slice(i, _ROWS_PER_BLOCK) for i in range(0, len(table), _ROWS_PER_BLOCK)]
    spec = job.model
    if not plan.num_gpus and not spec.intra_op_threads:
        spec = replace(spec, intra_op_threads=plan.num_cpus)  # TensorFlow's share of the node
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            ray_stages.decode_rows,
            fn_kwargs={"info": info, "limits": job.images},
            batch_size=_DECODE_BATCH,
            batch_format="numpy",
            num_cpus=1,
            scheduling_strategy="SPREAD",  # over every node
        )
        .map_batches(
            ray_stages.EmbedRows,
            fn_constructor_kwargs={
                "spec": spec,
                "fingerprint": info.fingerprint(),
                "batch_sizes": job.batch_sizes,
            },
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            batch_size=job.batch_sizes[-1],
            batch_format="numpy",
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            # What a model actor holds, so Ray places no more of them on a node than fit.
            # Being a resource the decode tasks do not ask for, it also keeps decoding an
            # operator of its own: Ray Data fuses a task map into the actor map after it
            # when their resources are equal (1 CPU each without GPUs), and the actors
            # would then decode too, in turn with the model, never past the actor count.
            memory=ACTOR_MEMORY_BYTES,
        )
    )


def _write(
    batch: dict[str, npt.NDArray[Any]], sink: IndexOutput, report: BulkReport, nodes: set[str]
) -> None:
    """The driver's part: one batch into ``sink`` (items are built only for an output
    that takes them), and into the report."""
    ok = []
    for i, status in enumerate(batch["status"]):
        if status == "fail":
            report.failed.append((str(batch["path"][i]), str(batch["error"][i])))
        elif status == "skip":
            report.skipped += 1
        else:
            ok.append(i)
    began = time.perf_counter()
    if sink.store is not None or sink.parquet is not None:
        sink.write([item_of(batch, i) for i in ok])
    report.stage_s["write"] += time.perf_counter() - began
    if "write_s" in batch:
        report.stage_s["write"] += float(batch["write_s"].sum())
    report.stage_s["read+decode"] += float(batch["decode_s"].sum())
    report.stage_s["embed"] += float(batch["embed_s"].sum())
    report.indexed += len(ok)
    nodes.update(str(n) for n in batch["decode_node"])
    nodes.update(str(n) for n in batch["embed_node"])
