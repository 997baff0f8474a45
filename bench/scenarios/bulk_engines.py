"""Bulk indexing with the local engine and with Ray on this machine (``batchserve index DIR
--engine local|ray``), in alternating rounds: images/s, wall time, peak resident memory of
the whole process tree (Ray's own processes and workers included), and the busy seconds of
each stage, from which ``bench/report/sections_bulk.py`` projects a cluster of GPU nodes."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import fill
from bench.harness.procs import tree_rss_bytes

ENGINES = ("local", "ray")


def run_once(engine: str, images: Path, directory: Path) -> dict[str, Any]:
    """One ``batchserve index`` into an empty data dir; its report, wall seconds (model
    loads and Ray's start included) and peak tree RSS."""
    report = directory / "report.json"
    command = [
        sys.executable, "-m", "batchserve.cli", "index", str(images),
        "--data-dir", str(directory / "data"), "--engine", engine, "--report", str(report),
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(directory)}  # Ray's token for its own cluster lands here
    started = time.monotonic()
    with open(directory / "stderr.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = _peak_rss_while_running(process)
    wall_s = time.monotonic() - started
    if process.returncode != 0:
        tail = (directory / "stderr.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"index --engine {engine} exited {process.returncode}: {tail}")
    return {**json.loads(report.read_text()), "wall_s": round(wall_s, 1), "peak_rss_bytes": peak}


def _peak_rss_while_running(process: subprocess.Popen[bytes]) -> int:
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.25):
            peak = max(peak, tree_rss_bytes(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    process.wait()
    done.set()
    sampler.join()
    return peak


def measure(count: int, rounds: int = 2) -> dict[str, Any]:
    """``count`` 640x480 JPEGs in 8 class folders, indexed ``rounds`` times by each engine,
    alternating (local, ray, local, ray, ...)."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-engines-"))
    try:
        images = fill.image_dir(directory / "images", count)
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in ENGINES}
        for n in range(rounds):
            for engine in ENGINES:
                where = directory / f"{engine}-{n}"
                where.mkdir()
                runs[engine].append(run_once(engine, images, where))
                shutil.rmtree(where / "data", ignore_errors=True)
        return {
            "images": count,
            "rounds": rounds,
            "cpus": os.cpu_count(),
            "runs": runs,
            "ratio_images_per_s": round(
                statistics.median(
                    ray["images_per_s"] / local["images_per_s"]
                    for local, ray in zip(runs["local"], runs["ray"], strict=True)
                ),
                3,
            ),
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
