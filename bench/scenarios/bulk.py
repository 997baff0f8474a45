"""Bulk indexing (``batchserve index DIR``): camera-sized JPEGs in class folders, decoded on
a thread pool while the model embeds. Runs what the command runs, in this process, and
reports the indexer's own count and time (model load excluded)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from batchserve.bulk.command import index_into
from batchserve.config import BulkSettings
from batchserve.storage.data_dir import StoreSettings
from bench.harness import fill


def index_directory(images: Path, data_dir: Path) -> dict[str, Any]:
    """``batchserve index IMAGES --data-dir DATA_DIR`` with default settings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchserve.bulk.sources import sources_for

    settings = BulkSettings(store=StoreSettings(data_dir=str(data_dir)))
    report = index_into(settings.job(), list(sources_for(str(images))))
    return {
        "indexed": report.indexed,
        "failed": len(report.failed),
        "seconds": round(report.seconds, 1),
        "images_per_s": round(report.images_per_s, 1),
    }


def measure(count: int) -> dict[str, Any]:
    """``count`` JPEGs (640x480) in 8 class folders, indexed into an empty data dir."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-bulk-"))
    try:
        images = fill.image_dir(directory / "images", count)
        return {"images": count, **index_directory(images, directory / "data")}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
