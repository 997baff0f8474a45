"""The settings of ``batchserve index`` beyond the server's: which engine, where its output
goes, and where Ray runs (read by config.py; used by bulk.py and ingest_ray.py)."""

from __future__ import annotations

from dataclasses import dataclass

from batchserve.errors import ConfigError
from batchserve.settings import setting


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
