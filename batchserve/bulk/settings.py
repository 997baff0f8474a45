"""What a bulk index runs: ``BulkJob``, the job the engines take, and the settings of
``batchserve index`` that are the bulk layer's own (which engine, where its output goes,
where Ray runs). config.py's ``BulkSettings`` reads them with the model's, the decoder's
and the store's, and makes the job."""

from __future__ import annotations

from dataclasses import dataclass

from batchserve.errors import ConfigError
from batchserve.models.images import DecodeLimits
from batchserve.models.spec import ModelSpec
from batchserve.settings import setting
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.index import IndexParams


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


@dataclass(frozen=True)
class RaySettings:
    """Where the Ray engine runs and how much of it embeds."""

    ray_address: str = setting(
        "",
        "Ray cluster for --engine ray: 'auto', HOST:PORT or ray://HOST:PORT ('': start Ray "
        "on this machine for this run)",
    )
    ray_cpus: int = setting(
        0, "CPUs of the Ray started on this machine (0: all of them)", at_least=0
    )
    ray_actors: int = setting(
        0,
        "model actors for --engine ray (0: one per GPU, or half the CPUs of a cluster "
        "without GPUs); CPUs are always left for decoding",
        at_least=0,
    )


@dataclass(frozen=True)
class BulkJob:
    """One ``batchserve index`` run, as the local and Ray engines take it: the model and
    how images are decoded for it, the data dir's store and FAISS index, the engine and its
    outputs, and where Ray runs."""

    model: ModelSpec
    images: DecodeLimits
    index: IndexParams
    store: StoreSettings
    bulk: EngineSettings
    ray: RaySettings
    #: The padded batch sizes the model runs, ascending; the largest is the batch size.
    batch_sizes: tuple[int, ...]
    #: Threads that read and decode images beside the model (the local engine).
    decode_threads: int
