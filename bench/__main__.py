"""python -m bench: load-test a batchserve server, or regenerate bench/RESULTS.md.

  python -m bench closed --url http://127.0.0.1:8080 --concurrency 1,32 --duration 20
  python -m bench report            # starts its own server, writes bench/RESULTS.md

Only ever point it at servers you run; the report starts its own on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchserve.testing import ServerProcess
from bench import fill, kinds, load, offline, scrape, server
from bench import images as bench_images

RESULTS = Path(__file__).parent / "RESULTS.md"


def _bodies(args: argparse.Namespace) -> list[bytes]:
    if args.images:
        return bench_images.from_directory(Path(args.images))
    return bench_images.sample_photos()


def run_point(
    url: str, route: str, bodies: list[bytes], concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, object]:
    before = scrape.scrape(url)
    result = load.closed_loop(
        url + route, bodies, "image/jpeg", concurrency, duration_s, warmup_s=warmup_s
    )
    view = scrape.difference(before, scrape.scrape(url))
    return {
        "concurrency": concurrency,
        "requests": len(result.samples),
        "images_per_s": round(result.images_per_s, 1),
        "p50_ms": round(result.percentile_ms(50), 1),
        "p90_ms": round(result.percentile_ms(90), 1),
        "p99_ms": round(result.percentile_ms(99), 1),
        "errors": result.errors,
        "mean_batch_size": round(view.mean_batch_size, 2),
        "mean_queue_wait_ms": round(view.mean_queue_wait_ms, 2),
        "mean_inference_ms": round(view.mean_inference_ms, 2),
        "mean_search_ms": round(view.mean_search_ms, 2),
    }


def closed(args: argparse.Namespace) -> int:
    bodies = _bodies(args)
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        point = run_point(
            args.url.rstrip("/"), args.route, bodies, concurrency, args.duration, args.warmup
        )
        print(json.dumps(point), flush=True)
    return 0


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, no GPU"


def report(args: argparse.Namespace) -> int:
    bodies = _bodies(args)
    sizes = [1, 2, 4, 8, 16, 32]
    model_name, rates = offline.model_rates(sizes, seconds=args.duration / 4)
    decode = offline.decode_rate(bodies, (160, 160))
    running = server.start([])
    try:
        points = [
            run_point(running.url, "/v1/embed", bodies, c, args.duration, args.warmup)
            for c in (1, 32)
        ]
    finally:
        running.stop()
    lines = [
        "# batchserve benchmark results",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}",
        f"- Machine: {_machine()}",
        f"- Model: built-in `{model_name}` (160x160, 1280-d), TensorFlow CPU",
        f"- Images: {len(bodies)} camera-sized JPEGs (640x480) made from scikit-image's photos",
        f"- Command: `python -m bench report --duration {args.duration:g}` "
        "(the load generator runs on the same 2 cores as the server)",
        "",
        "## The model alone (pre-decoded uint8 batches, no HTTP)",
        "",
        "| batch size | images/s |",
        "|---:|---:|",
        *[f"| {size} | {rate:.0f} |" for size, rate in rates.items()],
        "",
        f"JPEG decode + resize to 160x160 (Pillow, draft mode), one thread: {decode:.0f} images/s",
        "",
        "## `POST /v1/embed`, closed loop, one image per request",
        "",
        f"Start to ready (process start to `/readyz` 200, warm-up of every batch size "
        f"included): {running.ready_s:.1f} s",
        "",
        "| clients | images/s | p50 ms | p90 ms | p99 ms | mean batch | mean queue wait ms "
        "| mean inference ms/batch | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[
            f"| {p['concurrency']} | {p['images_per_s']} | {p['p50_ms']} | {p['p90_ms']} | "
            f"{p['p99_ms']} | {p['mean_batch_size']} | {p['mean_queue_wait_ms']} | "
            f"{p['mean_inference_ms']} | {p['errors'] or 'none'} |"
            for p in points
        ],
        "",
    ]
    if args.search_items:
        lines += search_section(args, bodies)
    if args.bulk_images:
        lines += bulk_section(args)
    if args.kinds_items:
        lines += kinds_section(args.kinds_items)
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


def _index_open(log: str) -> str:
    found = re.findall(r"index open: (\d+) items in a (\w+) index \((.*?), ([\d.]+) s\)", log)
    if not found:
        return "?"
    size, kind, how, seconds = found[-1]
    return f"{float(seconds):.1f} s ({size} items, {kind}, {how})"


def search_section(args: argparse.Namespace, bodies: list[bytes]) -> list[str]:
    """/v1/search on a big index, and restart times with it."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-search-"))
    try:
        fill_s = fill.fill(directory / "data", args.search_items)
        running = ServerProcess.start(directory, ["--no-demo"])
        try:
            restart = _index_open(running.log())
            restart_total = running.ready_s
            points = [
                run_point(running.url, "/v1/search?k=10", bodies, c, args.duration, args.warmup)
                for c in (1, 32)
            ]
        finally:
            running.stop()
        for path in (directory / "data" / "snapshots").glob("*"):
            path.unlink()
        running = ServerProcess.start(directory, ["--no-demo"])
        rebuild = _index_open(running.log())
        running.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    n = args.search_items
    return [
        f"## `POST /v1/search` (k=10) on a flat index of {n} items",
        "",
        f"The index holds {n} synthetic clustered unit vectors stored as the built-in model's "
        f"embeddings (filled in {fill_s:.0f} s by `bench/fill.py`); queries are the same "
        "photos as above, embedded by the model.",
        "",
        "| clients | searches/s | p50 ms | p90 ms | p99 ms | mean batch | mean inference "
        "ms/batch | mean search ms/batch | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[
            f"| {p['concurrency']} | {p['images_per_s']} | {p['p50_ms']} | {p['p90_ms']} | "
            f"{p['p99_ms']} | {p['mean_batch_size']} | {p['mean_inference_ms']} | "
            f"{p['mean_search_ms']} | {p['errors'] or 'none'} |"
            for p in points
        ],
        "",
        f"Restart with {n} items: index open from the snapshot in {restart}; whole start "
        f"to ready {restart_total:.1f} s (model load and warm-up included). Without a "
        f"snapshot (rebuilt from the catalog): {rebuild}.",
        "",
    ]


def kinds_section(items: int) -> list[str]:
    results = kinds.measure(items, 1280)
    return [
        f"## Index kinds against flat ({items} x 1280, default parameters)",
        "",
        "Synthetic clustered unit vectors (100 points per cluster, isotropic noise: a hard "
        "case, where neighbours within a cluster are nearly equidistant); 256 queries from "
        "the same clusters; `bench/kinds.py`.",
        "",
        "| kind | build s | ms/query alone | ms/query in batches of 32 | recall@10 |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {r.kind} | {r.build_s:.1f} | {r.ms_per_query_alone:.2f} | "
            f"{r.ms_per_query_batch32:.2f} | {r.recall_at_10:.3f} |"
            for r in results
        ],
        "",
    ]


def bulk_section(args: argparse.Namespace) -> list[str]:
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-bulk-"))
    try:
        images = fill.image_dir(directory / "images", args.bulk_images)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "batchserve.cli",
                "index",
                str(images),
                "--data-dir",
                str(directory / "data"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    found = re.search(r"indexed (\d+) images in ([\d.]+) s \((\d+) images/s\)", done.stderr)
    summary = (
        f"{found.group(1)} images in {found.group(2)} s: **{found.group(3)} images/s**"
        if found
        else f"failed: {done.stderr[-500:]}"
    )
    return [
        "## Bulk indexing (`batchserve index DIR`)",
        "",
        f"{args.bulk_images} camera-sized JPEGs (640x480) in 8 class folders, decoded on a "
        f"thread pool while the model embeds, one catalog transaction per batch of 32: "
        f"{summary} (model load excluded).",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("closed", help="closed-loop load against a running server")
    c.add_argument("--url", default="http://127.0.0.1:8080")
    c.add_argument("--route", default="/v1/embed")
    c.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    c.add_argument("--duration", type=float, default=20.0, help="seconds measured per point")
    c.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    c.add_argument("--images", help="directory of images to send (default: sample photos)")
    r = commands.add_parser("report", help="start a server, measure, write RESULTS.md")
    r.add_argument("--duration", type=float, default=20.0)
    r.add_argument("--warmup", type=float, default=3.0)
    r.add_argument("--images")
    r.add_argument("--out", default=str(RESULTS))
    r.add_argument(
        "--search-items",
        type=int,
        default=100_000,
        help="index size for the search benchmark (0: skip)",
    )
    r.add_argument(
        "--bulk-images",
        type=int,
        default=2000,
        help="images for the bulk-indexing benchmark (0: skip)",
    )
    r.add_argument(
        "--kinds-items",
        type=int,
        default=100_000,
        help="vectors for the index-kinds comparison (0: skip)",
    )
    args = parser.parse_args(argv)
    return closed(args) if args.command == "closed" else report(args)


if __name__ == "__main__":
    sys.exit(main())
