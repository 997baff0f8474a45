"""The RESULTS.md section of ``bench/scenarios/bulk_engines.py``: the local engine against
Ray on this machine, then, on paper, a cluster of GPU nodes from the per-image stage costs
measured."""

from __future__ import annotations

import statistics
from typing import Any

Section = dict[str, Any]
Lines = list[str]

#: Images/s of the built-in model (MobileNetV2, 160x160) on one GPU, for the projection
#: only: NOT measured here (this machine has no GPU). An assumption to replace with a figure
#: from the GPU at hand (`python -m bench report --only embed` on it).
ASSUMED_GPU_IMAGES_PER_S = 2000.0

#: Cores per GPU node in the projection; one is left to Ray and the actor's feeding.
NODE_CPUS = 8

NODE_COUNTS = (1, 2, 4, 8, 16)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _per_image_s(runs: list[dict[str, Any]], stage: str) -> float:
    return float(statistics.median(r["stage_s"][stage] / r["indexed"] for r in runs))


def projection(s: Section, nodes: int) -> dict[str, float]:
    """Images/s each stage allows on ``nodes`` GPU nodes of NODE_CPUS cores, from the Ray
    runs' busy seconds per image: decode on every core but one per node, the model at the
    assumed GPU rate, the driver's writes and the index build once, on one machine."""
    ray = s["runs"]["ray"]
    decode = nodes * (NODE_CPUS - 1) / _per_image_s(ray, "read+decode")
    write = 1.0 / _per_image_s(ray, "write")
    embed = nodes * ASSUMED_GPU_IMAGES_PER_S
    return {"read+decode": decode, "embed": embed, "write": write}


def bulk_engines(s: Section) -> Lines:
    rows = [_row(engine, runs) for engine, runs in s["runs"].items()]
    return [
        "## Bulk indexing: local engine against Ray on this machine (`batchserve index --engine`)",
        "",
        f"{s['images']} JPEGs (640x480) in 8 class folders, into an empty data dir, "
        f"{s['rounds']} rounds per engine alternating (local, ray, ...), {s['cpus']} CPUs; "
        "`bench/scenarios/bulk_engines.py`. images/s from the job's start (model loaded) to the "
        "snapshot; wall time includes loading the model and starting Ray; memory is the peak "
        "resident memory of the whole process tree (Ray's own processes and workers included). "
        "Stage columns: busy milliseconds per image (decode summed over threads or tasks).",
        "",
        "| engine | images/s | wall s | peak MiB | read+decode ms | embed ms | write ms "
        "| index s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Ray on one small box: **{s['ratio_images_per_s']:.2f}x** the local engine's images/s "
        "(median of the rounds' ratios). On 2 cores Ray gives the model one core (an actor "
        "never takes every CPU, so decoding keeps one) where the local engine's model uses "
        "both, and its own processes cost memory: it is there for more machines, not for one.",
        "",
        *_projection_lines(s),
    ]


def _row(engine: str, runs: list[dict[str, Any]]) -> str:
    stages = " | ".join(
        f"{_per_image_s(runs, stage) * 1000:.2f}" for stage in ("read+decode", "embed", "write")
    )
    index_s = statistics.median(r["stage_s"]["index"] for r in runs)
    return (
        f"| {engine} | {_median(runs, 'images_per_s'):.0f} | {_median(runs, 'wall_s'):.1f} | "
        f"{_median(runs, 'peak_rss_bytes') / 2**20:.0f} | {stages} | {index_s:.2f} |"
    )


def _projection_lines(s: Section) -> Lines:
    header = [
        f"On paper: N GPU nodes of {NODE_CPUS} cores, one model actor per GPU, the per-image "
        "stage costs above (decode on this machine's cores; the driver's one SQLite writer), "
        f"and the model at an **assumed** {ASSUMED_GPU_IMAGES_PER_S:.0f} images/s per GPU "
        "(not measured: no GPU here). The job runs at the slowest stage's rate.",
        "",
        "| GPU nodes | decode images/s | model images/s | driver write images/s | limit |",
        "|---:|---:|---:|---:|---|",
    ]
    rows = []
    for nodes in NODE_COUNTS:
        rates = projection(s, nodes)
        limit = min(rates, key=lambda stage: rates[stage])
        rows.append(
            f"| {nodes} | {rates['read+decode']:,.0f} | {rates['embed']:,.0f} | "
            f"{rates['write']:,.0f} | {limit} ({rates[limit]:,.0f} images/s) |"
        )
    return [*header, *rows, ""]
