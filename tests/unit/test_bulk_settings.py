"""``batchserve index`` settings: the engine and outputs, the Ray actor plan for a cluster's
resources, the hint when Ray is missing, and the command line. No Ray cluster is started."""

from __future__ import annotations

import sys

import pytest

from batchserve.bulk.command import index_into
from batchserve.bulk.ray_engine import ActorPlan, import_ray, plan_actors
from batchserve.bulk.settings import BulkJob, EngineSettings
from batchserve.cli import build_parser
from batchserve.config import BulkSettings, load, parse
from batchserve.errors import ConfigError


def test_the_local_engine_into_the_data_dir_is_the_default() -> None:
    settings = EngineSettings()
    assert (settings.engine, settings.output, settings.write_data_dir) == ("local", "", True)
    both = EngineSettings(engine="ray", output="out/e.parquet")
    assert both.write_data_dir and both.output == "out/e.parquet"
    assert not EngineSettings(output="e.parquet", write_data_dir=False).write_data_dir


def test_no_data_dir_needs_an_output_file() -> None:
    with pytest.raises(ConfigError, match=r"--no-write-data-dir needs --output PATH\.parquet"):
        EngineSettings(write_data_dir=False)


@pytest.mark.parametrize("output", ["e.csv", "e.parquet.tmp", "embeddings"])
def test_the_output_must_be_a_parquet_file(output: str) -> None:
    with pytest.raises(ConfigError, match=r"output must be a \.parquet file"):
        EngineSettings(output=output)


def test_the_engine_is_local_or_ray() -> None:
    with pytest.raises(ConfigError, match="engine"):
        parse(BulkSettings, [], {"BATCHSERVE_ENGINE": "spark"})
    assert parse(BulkSettings, [], {"BATCHSERVE_ENGINE": "ray"}).bulk.engine == "ray"


@pytest.mark.parametrize(
    ("cluster", "plan"),
    [
        ({"CPU": 2.0}, ActorPlan(actors=1, num_cpus=1, num_gpus=0)),
        ({"CPU": 3.0}, ActorPlan(actors=1, num_cpus=1, num_gpus=0)),
        ({"CPU": 16.0}, ActorPlan(actors=8, num_cpus=1, num_gpus=0)),  # half the CPUs
        ({"CPU": 8.0, "GPU": 2.0}, ActorPlan(actors=2, num_cpus=1, num_gpus=1)),  # one per GPU
        ({"CPU": 64.0, "GPU": 8.0, "memory": 1e12}, ActorPlan(8, 1, 1)),
    ],
)
def test_the_default_plan_is_one_actor_per_gpu_or_half_the_cpus(
    cluster: dict[str, float], plan: ActorPlan
) -> None:
    assert plan_actors(0, cluster) == plan


def test_a_wanted_number_of_actors_is_kept_when_it_fits() -> None:
    assert plan_actors(3, {"CPU": 16.0}) == ActorPlan(3, 1, 0)
    assert plan_actors(15, {"CPU": 16.0}) == ActorPlan(15, 1, 0)  # one CPU left to decode
    assert plan_actors(1, {"CPU": 8.0, "GPU": 2.0}) == ActorPlan(1, 1, 1)


def test_more_actors_than_gpus_are_refused() -> None:
    with pytest.raises(ConfigError, match="--ray-actors 3: the cluster has 2 GPUs"):
        plan_actors(3, {"CPU": 32.0, "GPU": 2.0})


def test_actors_that_would_take_every_cpu_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"take all 8 CPUs.*use --ray-actors 7 or fewer"):
        plan_actors(8, {"CPU": 8.0})
    with pytest.raises(ConfigError, match="take all 16 CPUs"):
        plan_actors(20, {"CPU": 16.0})
    with pytest.raises(ConfigError, match="take all 2 CPUs"):  # one GPU actor per CPU
        plan_actors(0, {"CPU": 2.0, "GPU": 2.0})


def test_a_one_cpu_cluster_has_no_cpu_to_spare_for_an_actor() -> None:
    with pytest.raises(ConfigError, match="leave none to decode: use a cluster with more CPUs"):
        plan_actors(0, {"CPU": 1.0})
    with pytest.raises(ConfigError, match="leave none to decode"):
        plan_actors(0, {})


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'batchserve\[ray\]'") as caught:
        import_ray()
    assert isinstance(caught.value.__cause__, ImportError)


def test_the_ray_engine_without_ray_fails_before_loading_a_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    settings = BulkSettings(bulk=EngineSettings(engine="ray")).job()
    with pytest.raises(ConfigError, match=r"--engine ray needs Ray: pip install"):
        index_into(settings, [])


def test_the_index_command_line_selects_ray_and_a_parquet_output() -> None:
    args = build_parser().parse_args(
        ["index", "images/", "--engine", "ray", "--ray-address", "auto", "--output", "x.parquet"]
    )
    assert (args.command, args.path) == ("index", "images/")
    settings = load(BulkSettings, args, {})
    assert settings.bulk == EngineSettings(engine="ray", output="x.parquet", write_data_dir=True)
    assert settings.ray.ray_address == "auto"
    assert (settings.ray.ray_cpus, settings.ray.ray_actors) == (0, 0)


def test_the_index_command_line_can_write_only_the_parquet_file() -> None:
    args = build_parser().parse_args(
        ["index", "s3://bucket/m.parquet", "--output", "x.parquet", "--no-write-data-dir"]
    )
    settings = load(BulkSettings, args, {})
    assert args.path == "s3://bucket/m.parquet"
    assert settings.bulk == EngineSettings(output="x.parquet", write_data_dir=False)
    with pytest.raises(ConfigError, match="--no-write-data-dir needs --output"):
        parse(BulkSettings, ["--no-write-data-dir"], {})


def test_ray_settings_refuse_negative_counts() -> None:
    with pytest.raises(ConfigError, match="ray_actors must be at least 0"):
        parse(BulkSettings, ["--ray-actors", "-1"], {})
    assert parse(BulkSettings, ["--ray-cpus", "4"], {}).ray.ray_cpus == 4


def test_the_job_carries_the_padded_batch_sizes_and_decode_threads_of_the_settings() -> None:
    settings = parse(
        BulkSettings,
        ["--max-batch-size", "8", "--decode-threads", "3", "--engine", "ray", "--ray-cpus", "2"],
        {"BATCHSERVE_DATA_DIR": "/srv/data"},
    )
    job = settings.job()
    assert isinstance(job, BulkJob)
    assert (job.batch_sizes, job.decode_threads) == ((1, 2, 4, 8), 3)
    assert (job.bulk, job.ray, job.store) == (settings.bulk, settings.ray, settings.store)
    assert (job.model, job.images, job.index) == (settings.model, settings.images, settings.index)
    assert job.store.data_dir == "/srv/data" and job.bulk.engine == "ray"


def test_the_job_counts_one_decode_thread_per_core_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert BulkSettings().job().decode_threads == 6
    assert parse(BulkSettings, ["--batch-sizes", "4,1"], {}).job().batch_sizes == (1, 4, 32)
