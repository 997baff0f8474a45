"""A re-run of ``batchserve index`` with nothing new knows so without loading the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from batchserve.bulk import rerun
from batchserve.bulk.sources import Source, sha256_hex
from batchserve.config import BulkSettings
from batchserve.models.spec import ModelSpec
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.records import NewItem
from batchserve.storage.sqlite import SqliteCatalog


def indexed(
    tmp_path: Path, files: int = 3, features: bytes | None = b"packed"
) -> tuple[BulkSettings, list[Source]]:
    """A data dir whose catalog holds ``files`` photos as a local run leaves it (with
    ``features`` for each)."""
    settings = BulkSettings(store=StoreSettings(data_dir=str(tmp_path / "data"), demo=False))
    sources = []
    catalog = SqliteCatalog(tmp_path / "data" / "catalog.sqlite3", dim=4)
    for i in range(files):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(b"photo %d" % i)
        sources.append(Source(str(path), f"photo-{i}"))
        vector = np.eye(4, dtype=np.float32)[i % 4]
        digest = sha256_hex(path.read_bytes())
        catalog.upsert([NewItem(f"photo-{i}", vector, digest=digest, features=features)])
    rerun.record(catalog, settings.job())
    catalog.close()
    return settings, sources


def test_nothing_new_is_known_without_the_model(tmp_path: Path) -> None:
    settings, sources = indexed(tmp_path)
    assert rerun.unchanged(settings.job(), sources) == 3


def test_a_new_a_changed_file_or_another_model_means_the_model_is_needed(
    tmp_path: Path,
) -> None:
    settings, sources = indexed(tmp_path)
    job = settings.job()
    extra = tmp_path / "new.jpg"
    extra.write_bytes(b"new")
    assert rerun.unchanged(job, [*sources, Source(str(extra), "new")]) is None
    Path(sources[0].path).write_bytes(b"edited")
    assert rerun.unchanged(job, sources) is None
    Path(sources[0].path).write_bytes(b"photo 0")
    other = dataclasses.replace(job, model=ModelSpec(source="keras:MobileNetV3Small"))
    assert rerun.unchanged(other, sources) is None
    assert rerun.unchanged(job, sources) == 3


def test_items_without_local_features_need_the_model_unless_the_run_finds_none(
    tmp_path: Path,
) -> None:
    settings, sources = indexed(tmp_path, features=None)  # indexed before local features
    assert rerun.unchanged(settings.job(), sources) is None
    job = settings.job()
    without = dataclasses.replace(job, images=dataclasses.replace(job.images, local_features=False))
    assert rerun.unchanged(without, sources) == 3


def test_a_data_dir_not_made_yet_is_not_made_by_the_check(tmp_path: Path) -> None:
    settings = BulkSettings(store=StoreSettings(data_dir=str(tmp_path / "none"), demo=False))
    assert rerun.unchanged(settings.job(), []) is None
    assert not (tmp_path / "none").exists()


def test_the_local_engine_does_not_load_the_model_for_nothing_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchserve.bulk.command import index_locally
    from batchserve.models import loaders

    def never(_spec: ModelSpec) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loaders, "load_model", never)
    settings, sources = indexed(tmp_path)
    announced: list[int] = []
    report = index_locally(settings.job(), sources, announced.append, lambda _report: None)
    assert (report.indexed, report.skipped, announced) == (0, 3, [3])
