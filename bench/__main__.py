"""python -m bench: load-test a batchserve deployment, or regenerate bench/RESULTS.md.

  python -m bench run --url http://127.0.0.1:8080 --mode open --rates 20,50,100 --plot out.png
  python -m bench run --url http://127.0.0.1:8080 --mode closed --concurrency 1,8,32
  python -m bench report            # starts its own servers, writes bench/RESULTS.md + plots

Only ever point it at servers you run; the report starts its own on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from batchserve.testing import ServerProcess
from bench import fill, kinds, load, offline, overload, plots, point, procs
from bench import images as bench_images
from bench.bodies import ENCODINGS, build_requests

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"


def _images(directory: str | None) -> list[bytes]:
    if directory:
        return bench_images.from_directory(Path(directory))
    return bench_images.sample_photos()


def _spec(url: str, requests: list[bytes], args: argparse.Namespace, **kw: Any) -> load.LoadSpec:
    return load.LoadSpec(
        url=url,
        requests=requests,
        duration_s=args.duration,
        warmup_s=args.warmup,
        poisson=getattr(args, "poisson", False),
        **kw,
    )


def _values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run_command(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    requests = build_requests(
        base, args.route, _images(args.images), args.encoding, args.images_per_request
    )
    if args.mode == "open":
        spec = _spec(base + args.route, requests, args, rate=1.0)
        values = _values(args.rates)
    else:
        spec = _spec(base + args.route, requests, args, concurrency=1)
        values = _values(args.concurrency)
    points = []
    for value in values:
        one = point.sweep(
            base, spec, [value], args.processes, args.slo_ms, args.images_per_request
        )[0]
        print(json.dumps(one), flush=True)
        points.append(one)
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=2))
    if args.plot:
        plots.plot_sweep(points, f"{args.route} ({args.mode} loop)", Path(args.plot))
    return 0


# -- the report ---------------------------------------------------------------------------


def _row(name: str, p: dict[str, Any]) -> str:
    server = p.get("server", {})
    load_text = (
        f"{p['offered_per_s']:g}/s"
        if p["offered_per_s"] is not None
        else f"{p['concurrency']} clients"
    )
    errors = ", ".join(f"{k}: {v}" for k, v in p["errors"].items()) or "none"
    return (
        f"| {name} | {load_text} | {p['achieved_per_s']} | {p['goodput_per_s']} | "
        f"{p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | {p['p999_ms']} | "
        f"{server.get('mean_batch_size', '-')} | {errors} |"
    )


def _ratio(p: dict[str, Any], q: dict[str, Any]) -> float:
    return float(p["images_per_s"]) / max(float(q["images_per_s"]), 1e-9)


HEADER = [
    "| server | load | achieved/s | goodput/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
    "| mean batch | errors |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
]


class Report:
    """Runs every measurement of RESULTS.md on this machine, one after the other."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.images = _images(args.images)
        self.out_dir = Path(args.out).parent
        self.lines: list[str] = []
        self.data: dict[str, Any] = {}

    def spec(self, url: str, requests: list[bytes], **kw: Any) -> load.LoadSpec:
        return _spec(url, requests, self.args, **kw)

    def points(
        self, base: str, route: str, rates: list[float], clients: list[int]
    ) -> list[dict[str, Any]]:
        requests = build_requests(base, route, self.images)
        out = []
        for c in clients:
            out.append(
                point.measure(
                    base, self.spec(base + route, requests, concurrency=c), 1, self.args.slo_ms
                )
            )
        for r in rates:
            out.append(
                point.measure(base, self.spec(base + route, requests, rate=r), 1, self.args.slo_ms)
            )
        return out

    def batchserve(
        self, name: str, server_args: list[str], rates: list[float], clients: list[int]
    ) -> tuple[list[dict[str, Any]], int, float]:
        running = ServerProcess.start(
            Path(tempfile.mkdtemp(prefix="batchserve-bench-")), ["--no-demo", *server_args]
        )
        try:
            points, rss = self.embed_load(name, running.url, running.process.pid, rates, clients)
        finally:
            running.stop()
        return points, rss, running.ready_s

    def baseline(
        self, name: str, module: str, rates: list[float], clients: list[int]
    ) -> tuple[list[dict[str, Any]], int]:
        started = procs.start_baseline(module, workers=os.cpu_count() or 2)
        try:
            return self.embed_load(name, started.url, started.process.pid, rates, clients)
        finally:
            started.stop()

    def embed_load(
        self, name: str, url: str, pid: int, rates: list[float], clients: list[int]
    ) -> tuple[list[dict[str, Any]], int]:
        """The /v1/embed points of one server, and its resident memory after them."""
        points = self.points(url, "/v1/embed", rates, clients)
        self.data[name] = points
        return points, procs.tree_rss_bytes(pid)

    def run(self) -> str:
        a = self.args
        sizes = [1, 2, 4, 8, 16, 32]
        model_name, rates = offline.model_rates(sizes, seconds=4)
        decode = offline.decode_rate(self.images, (160, 160))
        limit = offline.limit_rate(self.images, seconds=10)
        single_ms = 1000.0 / rates[1]
        paced_ms = offline.paced_single_ms()
        offered = _values(a.rates)
        clients = [int(c) for c in _values(a.clients)]

        on, on_rss, ready_s = self.batchserve("batchserve", [], offered, clients)
        low = self.low_load()
        off, off_rss, _ = self.batchserve("batching off", ["--max-batch-size", "1"], offered, [32])
        base_a, rss_a = self.baseline("(a) Flask + model.predict", "flask_predict", offered, [32])
        base_b, rss_b = self.baseline("(b) Flask + tf.function", "flask_function", offered, [32])
        # Saturation: the most images/s any point sustained (closed loop keeps the server
        # busy without piling up an unbounded queue).
        saturation = max((p for p in on if p["concurrency"]), key=lambda p: p["images_per_s"])
        at32 = {
            name: next(p for p in pts if p["concurrency"] == 32)
            for name, pts in (("on", on), ("off", off), ("a", base_a), ("b", base_b))
        }

        plots.plot_compare(
            {
                "batchserve": on,
                "batching off": off,
                "(a) Flask+predict": base_a,
                "(b) Flask+tf.function": base_b,
            },
            "POST /v1/embed, open loop",
            self.out_dir / "embed_sweep.png",
        )
        plots.plot_sweep(
            [p for p in on if p["offered_per_s"]],
            "batchserve /v1/embed",
            self.out_dir / "embed_batches.png",
        )

        lines = self.lines
        lines += [
            "# batchserve benchmark results",
            "",
            f"- Date: {time.strftime('%Y-%m-%d')}",
            f"- Machine: {_machine()}",
            f"- Model: built-in `{model_name}` (160x160, 1280-d), TensorFlow CPU",
            f"- Images: {len(self.images)} camera-sized JPEGs (640x480) made from "
            "scikit-image's photos, one per request, raw body",
            f"- Command: `python -m bench report` (points of {a.duration:g} s after "
            f"{a.warmup:g} s of warm-up; latency SLO for goodput {a.slo_ms:g} ms; the load "
            "generator runs on the same 2 cores as the server)",
            "",
            "## 1. The limit (no HTTP)",
            "",
            "The model alone on pre-decoded uint8 batches:",
            "",
            "| batch size | images/s |",
            "|---:|---:|",
            *[f"| {size} | {rate:.0f} |" for size, rate in rates.items()],
            "",
            f"JPEG decode + resize to 160x160 (draft mode), one thread: {decode:.0f} images/s.",
            "",
            f"**The limit**: decoding (one thread, ahead of the model) and embedding the same "
            f"JPEGs at batch 32 in one loop: **{limit:.0f} images/s**.",
            "",
            "## 2. batchserve at saturation",
            "",
            f"Best point: {saturation['images_per_s']} images/s "
            f"(**{saturation['images_per_s'] / limit:.0%} of the limit**), p50 "
            f"{saturation['p50_ms']} ms, p99 {saturation['p99_ms']} ms "
            f"({_row('', saturation).split('|')[2].strip()}). Start to ready: {ready_s:.1f} s.",
            "",
            *HEADER,
            *[_row("batchserve", p) for p in on],
            "",
            "![latency against throughput](embed_sweep.png)",
            "",
            "![batch sizes per point](embed_batches.png)",
            "",
            "## 3. Batching off (`--max-batch-size 1`) against on",
            "",
            *HEADER,
            *[_row("batching off", p) for p in off],
            "",
            "## 4. The usual alternatives, same model, gunicorn with one worker per core",
            "",
            *HEADER,
            *[_row("(a) Flask + model.predict", p) for p in base_a],
            *[_row("(b) Flask + tf.function", p) for p in base_b],
            "",
            "At 32 concurrent clients (closed loop):",
            "",
            "| server | images/s | p99 ms | resident memory |",
            "|---|---:|---:|---:|",
            f"| batchserve | {at32['on']['images_per_s']} | {at32['on']['p99_ms']} | "
            f"{on_rss / 2**20:.0f} MiB |",
            f"| batching off | {at32['off']['images_per_s']} | {at32['off']['p99_ms']} | "
            f"{off_rss / 2**20:.0f} MiB |",
            f"| (a) Flask + model.predict | {at32['a']['images_per_s']} | "
            f"{at32['a']['p99_ms']} | {rss_a / 2**20:.0f} MiB |",
            f"| (b) Flask + tf.function | {at32['b']['images_per_s']} | "
            f"{at32['b']['p99_ms']} | {rss_b / 2**20:.0f} MiB |",
            "",
            f"batchserve / (a): {_ratio(at32['on'], at32['a']):.1f}x; "
            f"batchserve / (b): {_ratio(at32['on'], at32['b']):.1f}x.",
            "",
            *low_load_section(low, single_ms, paced_ms, max(a.duration, 20)),
        ]
        if a.search_items:
            lines += self.search_section()
        if a.bulk_images:
            lines += bulk_section(a)
        if a.kinds_items:
            lines += kinds_section(a.kinds_items)
        lines += ceiling_section()
        if a.overload_s:
            figures = overload.measure(self.images, seconds=a.overload_s)
            self.data["overload"] = figures
            lines += overload.section(figures, a.overload_s)
        (self.out_dir / "results.json").write_text(json.dumps(self.data, indent=1))
        return "\n".join(lines)

    def low_load(self) -> dict[str, Any]:
        running = ServerProcess.start(
            Path(tempfile.mkdtemp(prefix="batchserve-bench-")), ["--no-demo"]
        )
        try:
            requests = build_requests(running.url, "/v1/embed", self.images)
            spec = load.LoadSpec(
                url=running.url + "/v1/embed",
                requests=requests,
                duration_s=max(self.args.duration, 20),
                warmup_s=2,
                rate=1.0,
            )
            return point.measure(running.url, spec, 1, self.args.slo_ms)
        finally:
            running.stop()

    def search_adds(self, url: str, rounds: int = 3) -> dict[str, float]:
        """p50 of /v1/search minus p50 of /v1/embed at one client, alternated so that drift
        of the machine's speed hits both alike."""
        embed_requests = build_requests(url, "/v1/embed", self.images)
        search_requests = build_requests(url, "/v1/search?k=10", self.images)
        embed: list[float] = []
        search: list[float] = []
        stage: list[float] = []
        for _ in range(rounds):
            for requests, route, out in (
                (embed_requests, "/v1/embed", embed),
                (search_requests, "/v1/search?k=10", search),
            ):
                spec = _spec(url + route, requests, self.args, concurrency=1)
                spec = dataclasses.replace(spec, duration_s=5.0, warmup_s=1.0)
                measured = point.measure(url, spec, 1, self.args.slo_ms)
                out.append(measured["p50_ms"])
                if route != "/v1/embed":
                    stage.append(measured.get("server", {}).get("mean_search_ms", 0.0))
        result = {
            "embed_p50_ms": statistics.median(embed),
            "search_p50_ms": statistics.median(search),
            "adds_ms": statistics.median(search) - statistics.median(embed),
            "search_stage_ms": statistics.median(stage),
        }
        self.data["search_adds"] = result
        return result

    def search_section(self) -> list[str]:
        n = self.args.search_items
        directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-search-"))
        try:
            fill_s = fill.fill(directory / "data", n)
            running = ServerProcess.start(directory, ["--no-demo"])
            try:
                restart = _index_open(running.log())
                restart_total = running.ready_s
                points = self.points(running.url, "/v1/search?k=10", [5, 20, 40], [1, 32])
            finally:
                running.stop()
            for path in (directory / "data" / "snapshots").glob("*"):
                path.unlink()
            running = ServerProcess.start(directory, ["--no-demo"])
            rebuild = _index_open(running.log())
            running.stop()
            # The same items in an HNSW index (built from the catalog at start).
            running = ServerProcess.start(directory, ["--no-demo", "--index-kind", "hnsw"])
            try:
                hnsw_build = _index_open(running.log())
                hnsw = self.points(running.url, "/v1/search?k=10", [5, 20, 40], [1, 32])
                adds = self.search_adds(running.url)
            finally:
                running.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        self.data["search"] = points
        self.data["search_hnsw"] = hnsw
        plots.plot_sweep(
            [p for p in points if p["offered_per_s"]],
            "/v1/search, 100k flat",
            self.out_dir / "search_sweep.png",
        )
        return [
            f"## 6. `POST /v1/search` (k=10) on {n} items, flat and hnsw",
            "",
            f"The index holds {n} synthetic clustered unit vectors stored as the built-in "
            f"model's embeddings (filled in {fill_s:.0f} s by `bench/fill.py`); queries are "
            "the photos above, embedded by the model.",
            "",
            *HEADER,
            *[_row("flat", p) for p in points],
            *[_row("hnsw", p) for p in hnsw],
            "",
            "| index | load | mean inference ms/batch | mean search ms/batch |",
            "|---|---|---:|---:|",
            *[
                f"| {kind} | {_row('', p).split('|')[2].strip()} | "
                f"{p.get('server', {}).get('mean_inference_ms')} | "
                f"{p.get('server', {}).get('mean_search_ms')} |"
                for kind, pts in (("flat", points), ("hnsw", hnsw))
                for p in pts
            ],
            "",
            f"The HNSW index (M=32, efSearch=256) was built from the catalog at start in "
            f"{hnsw_build}.",
            "",
            "What search adds to a request (hnsw, 1 client, closed loop, /v1/embed and "
            "/v1/search?k=10 alternated on the same server, 3 rounds each): p50 "
            f"{adds['embed_p50_ms']:.1f} ms for embed, {adds['search_p50_ms']:.1f} ms for "
            f"search: **search adds {adds['adds_ms']:.1f} ms** (the index stage alone: "
            f"{adds['search_stage_ms']:.2f} ms per single-query batch).",
            "",
            "![search latency](search_sweep.png)",
            "",
            f"Restart with {n} items: index open from the snapshot in {restart}; whole "
            f"start to ready {restart_total:.1f} s (model load and warm-up included). "
            f"Without a snapshot (rebuilt from the catalog): {rebuild}.",
            "",
        ]


def low_load_section(
    low: dict[str, Any], single_ms: float, paced_ms: float, seconds: float
) -> list[str]:
    """Section 5: p50 at 1 request/s against the model's own time, and where the rest goes."""
    server = low.get("server", {})
    inside = server.get("mean_request_ms", 0.0)
    stages = (
        server.get("mean_decode_ms", 0.0)
        + server.get("mean_queue_wait_ms", 0.0)
        + server.get("mean_inference_ms", 0.0)
    )
    return [
        "## 5. Low load",
        "",
        f"Open loop at 1 request/s for {seconds:g} s: p50 {low['p50_ms']} ms, p99 "
        f"{low['p99_ms']} ms. The model alone at batch 1: {single_ms:.1f} ms called back to "
        f"back, {paced_ms:.1f} ms (p50) called once a second as here. p50 minus the paced "
        f"model: **{low['p50_ms'] - paced_ms:.1f} ms**; minus the back-to-back model: "
        f"{low['p50_ms'] - single_ms:.1f} ms.",
        "",
        "Where a request's time goes (means, from the server's /metrics):",
        "",
        "| stage | ms |",
        "|---|---:|",
        f"| decode (decode pool) | {server.get('mean_decode_ms', 0.0):.2f} |",
        f"| queue wait (Batcher) | {server.get('mean_queue_wait_ms', 0.0):.2f} |",
        f"| inference (batch of 1) | {server.get('mean_inference_ms', 0.0):.2f} |",
        f"| rest inside the handler (thread hand-offs, parsing, JSON) | {inside - stages:.2f} |",
        f"| handler total | {inside:.2f} |",
        f"| outside the handler (TCP, HTTP framing, the generator), p50 minus total | "
        f"{low['p50_ms'] - inside:.2f} |",
        "",
    ]


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


def _index_open(log: str) -> str:
    found = re.findall(r"index open: (\d+) items in a (\w+) index \((.*?), ([\d.]+) s\)", log)
    if not found:
        return "?"
    size, kind, how, seconds = found[-1]
    return f"{float(seconds):.1f} s ({size} items, {kind}, {how})"


CEILING_TITLE = "## 7. The load generator's own ceiling"


def ceiling_section(duration_s: float = 10.0) -> list[str]:
    """``GET /healthz`` of one batchserve at 32 connections: wrk (when installed) against
    this generator with 1 and 2 processes, on the same cores as the server."""
    running = ServerProcess.start(Path(tempfile.mkdtemp(prefix="batchserve-bench-")), ["--no-demo"])
    rows = []
    try:
        if shutil.which("wrk"):
            done = subprocess.run(
                ["wrk", "-t1", "-c32", f"-d{duration_s:g}s", running.url + "/healthz"],
                capture_output=True,
                text=True,
                check=False,
            )
            found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
            rows.append(
                f"| `wrk -t1 -c32 -d{duration_s:g}s` | "
                f"{float(found.group(1)) if found else float('nan'):,.0f} | - | - |"
            )
        else:
            rows.append("| wrk (not installed: `apt-get install wrk`) | - | - | - |")
        requests = build_requests(running.url, "/healthz", [])
        for processes in (1, 2):
            spec = load.LoadSpec(
                url=running.url + "/healthz",
                requests=requests,
                duration_s=duration_s,
                warmup_s=2,
                concurrency=32,
            )
            p = point.measure(running.url, spec, processes)
            rows.append(
                f"| `python -m bench run --route /healthz --mode closed "
                f"--concurrency 32 --processes {processes}` | "
                f"{p['achieved_per_s']:,.0f} | {p['p50_ms']} | {p['p99_ms']} |"
            )
    finally:
        running.stop()
    return [
        CEILING_TITLE,
        "",
        "A trivial endpoint of the same server, 32 connections; server and generator share "
        "the machine's cores, so the generator's own CPU is taken from the server.",
        "",
        "| generator | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]


def put_section(path: Path, title: str, lines: list[str]) -> None:
    """Put a section (starting with its ``title`` line) into RESULTS.md: in place of the
    one with that title, or at the end."""
    section = "\n".join(lines)
    text = path.read_text() if path.exists() else ""
    start = text.find(title)
    if start != -1:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(section)


def ceiling_command(args: argparse.Namespace) -> int:
    """Measure the ceiling alone and put its section into RESULTS.md in place."""
    put_section(Path(args.out), CEILING_TITLE, ceiling_section(args.duration))
    return 0


def overload_command(args: argparse.Namespace) -> int:
    """Run the overload scenario alone and put its section into RESULTS.md in place."""
    figures = overload.measure(_images(args.images), seconds=args.duration)
    put_section(Path(args.out), overload.TITLE, overload.section(figures, args.duration))
    return 0 if figures["server_alive"] else 1


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
    r = commands.add_parser("run", help="load a running server: open or closed loop, a sweep")
    r.add_argument("--url", default="http://127.0.0.1:8080")
    r.add_argument(
        "--route", default="/v1/embed", help="/v1/embed, /v1/classify, /v1/search?k=10 or /v1/items"
    )
    r.add_argument("--mode", choices=("open", "closed"), default="closed")
    r.add_argument("--rates", default="10,50,100", help="open loop: requests/s per point")
    r.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    r.add_argument("--concurrency", default="1,32", help="closed loop: clients per point")
    r.add_argument("--duration", type=float, default=20.0, help="seconds measured per point")
    r.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    r.add_argument("--processes", type=int, default=1, help="load-generator processes")
    r.add_argument("--slo-ms", type=float, default=1000.0, help="latency SLO for goodput")
    r.add_argument("--encoding", choices=ENCODINGS, default="raw")
    r.add_argument("--images-per-request", type=int, default=1)
    r.add_argument("--images", help="directory of images to send (default: sample photos)")
    r.add_argument("--json", help="write the points to this JSON file")
    r.add_argument("--plot", help="write a PNG plot of the sweep")
    rep = commands.add_parser("report", help="start servers, measure, write RESULTS.md")
    rep.add_argument("--duration", type=float, default=10.0)
    rep.add_argument("--warmup", type=float, default=3.0)
    rep.add_argument("--slo-ms", type=float, default=1000.0)
    rep.add_argument("--rates", default="5,20,50,100,150,200,250")
    rep.add_argument("--clients", default="1,8,32,64")
    rep.add_argument("--images")
    rep.add_argument("--out", default=str(RESULTS))
    rep.add_argument(
        "--search-items",
        type=int,
        default=100_000,
        help="index size for the search benchmark (0: skip)",
    )
    rep.add_argument(
        "--bulk-images",
        type=int,
        default=2000,
        help="images for the bulk-indexing benchmark (0: skip)",
    )
    rep.add_argument(
        "--kinds-items",
        type=int,
        default=100_000,
        help="vectors for the index-kinds comparison (0: skip)",
    )
    rep.add_argument(
        "--overload-s",
        type=float,
        default=60.0,
        help="seconds of the 3x overload scenario (0: skip)",
    )
    c = commands.add_parser("ceiling", help="the generator against wrk; updates RESULTS.md")
    c.add_argument("--duration", type=float, default=10.0)
    c.add_argument("--out", default=str(RESULTS))
    o = commands.add_parser("overload", help="3x the saturation rate; updates RESULTS.md")
    o.add_argument("--duration", type=float, default=60.0)
    o.add_argument("--images")
    o.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_command(args)
    if args.command == "ceiling":
        return ceiling_command(args)
    if args.command == "overload":
        return overload_command(args)
    text = Report(args).run()
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
