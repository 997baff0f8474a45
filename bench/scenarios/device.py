"""The GPU path end to end (``python -m bench device``), made to run on a lent GPU machine
in one command of under 10 minutes, and here on the CPU (``--cpu --quick``) so it cannot rot.

With the built-in model on ``--backend`` (PyTorch by default: what such machines carry):
the model alone at batch 1 to 256; one decode thread alone; FAISS searching 100,000 items;
then a server over HTTP, single-image and 8-image requests at rising concurrency (images/s,
p50, p99, mean batch, GPU utilisation sampled by ``nvidia-smi``, the CPU of the server, of
its reactor thread and of the load generator); and which of model, decode, reactor or load
generator was nearest its limit at the best point."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.harness import load, procs, scrape
from bench.harness.bodies import build_requests
from bench.scenarios import offline


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run for a GPU machine, or a quick one."""

    batch_sizes: tuple[int, ...]
    clients: tuple[int, ...]
    items: int
    seconds: float
    model_s: float
    #: Edge processes (``--workers``) of the servers measured after the first (which has
    #: none), each at the most clients with one image per request: the reactor-bound load.
    edges: tuple[int, ...] = ()

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls((1, 8, 32), (1, 8), 10_000, 3.0, 1.0, (2,))
        return cls(
            (1, 8, 32, 64, 128, 256), (1, 8, 32, 64, 128, 256), 100_000, 10.0, 4.0, (1, 2, 4, 8)
        )


#: Images per request in the two kinds of request measured.
PER_REQUEST = (1, 8)
#: Load generator processes: it is one of the limits measured, so it gets several.
GENERATORS = max(1, min(4, (os.cpu_count() or 2) // 4))


def device_name(on_cpu: bool) -> str:
    """The GPU as ``nvidia-smi`` names it, or the CPU."""
    if not on_cpu and shutil.which("nvidia-smi"):
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        ).stdout.split("\n")  # fmt: skip
        if names and names[0].strip():
            return names[0].strip()
    return "CPU (no GPU)"


def model_figures(backend: str, device: str, plan: Plan) -> dict[str, float]:
    """Images/s of the model alone at each batch size."""
    args: dict[str, object] = {"backend": backend, "device": device}
    _name, rates = offline.model_rates(list(plan.batch_sizes), plan.model_s, model_args=args)
    return {str(size): round(rate, 1) for size, rate in rates.items()}


def search_figures(items: int, dim: int = 1280, k: int = 10) -> dict[str, Any]:
    """ms per FAISS search call over ``items`` unit vectors (the default flat index), for
    a batch of 1 and of 32 queries."""
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((items, dim), dtype=np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    timings = {}
    for batch in (1, 32):
        queries = vectors[:batch]
        index.search(queries, k)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            index.search(queries, k)
            calls += 1
        timings[str(batch)] = round(1000.0 * (time.perf_counter() - started) / calls, 2)
    return {"items": items, "dim": dim, "k": k, "ms_per_call": timings}


class GpuSampler:
    """GPU utilisation sampled by ``nvidia-smi`` every 200 ms while it runs (None without)."""

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if line.strip().isdigit():
                self._samples.append(float(line.strip()))

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def mean(self) -> float | None:
        return round(float(np.mean(self._samples)), 1) if self._samples else None


class CpuMeter:
    """The CPU a server process (all its threads, and its main thread: the reactor) and
    this process with its finished children (the load generator) use over a span, as % of
    one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._threads = self._server()
        self._mine = os.times()
        self._started = time.perf_counter()

    def _server(self) -> dict[int, float]:
        return {t.tid: t.cpu_s for t in procs.thread_cpu(self.pid)}

    def read(self) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        threads, mine = self._server(), os.times()
        used = {tid: cpu - self._threads.get(tid, 0.0) for tid, cpu in threads.items()}
        generator = sum(mine[i] - self._mine[i] for i in range(4))  # user, system, children's
        return {
            "server_cpu_pct": round(100 * sum(used.values()) / wall, 1),
            "reactor_cpu_pct": round(100 * used.get(self.pid, 0.0) / wall, 1),
            "generator_cpu_pct": round(100 * generator / wall, 1),
        }


def one_point(
    url: str, pid: int, images: list[bytes], per_request: int, clients: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop load point against the server at ``url`` (process ``pid``)."""
    encoding = "raw" if per_request == 1 else "multipart"
    requests = build_requests(url, "/v1/embed", images, encoding, per_request)
    spec = load.LoadSpec(url + "/v1/embed", requests, seconds, warmup_s=1.0, concurrency=clients)
    before = scrape.scrape(url)
    meter = CpuMeter(pid)
    with GpuSampler() as gpu:
        result = load.run(spec, processes=GENERATORS)
    cpu = meter.read()
    view = scrape.difference(before, scrape.scrape(url))
    return {
        "images_per_request": per_request,
        "clients": clients,
        "images_per_s": round(result.achieved_per_s() * per_request, 1),
        "p50_ms": round(result.percentile_ms(50), 1),
        "p99_ms": round(result.percentile_ms(99), 1),
        "errors": result.errors(),
        "mean_batch": round(view.mean_batch_size, 1),
        "gpu_util_pct": gpu.mean(),
        **cpu,
    }


def server_figures(
    backend: str, device: str, images: list[bytes], plan: Plan
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every load point against one server, and the server's own view of itself."""
    top = max(plan.batch_sizes)
    # The points measure throughput, not admission: a deadline long enough that a slow
    # device (the CPU of --cpu) is never refused for the wait its own queue makes.
    flags = ["--no-demo", "--backend", backend, "--device", device, "--timeout-s", "120",
             "--max-batch-size", str(top), "--max-queue", str(4 * top * 8)]  # fmt: skip
    points = []
    # One process first: the reactor's share is its main thread's (edges: edge_figures).
    with procs.temporary_server([*flags, "--workers", "0"], prefix="batchserve-device-") as server:
        pid = server.process.pid
        for per_request in PER_REQUEST:
            for clients in plan.clients:
                point = one_point(server.url, pid, images, per_request, clients, plan.seconds)
                print(f"device: {point}", flush=True)
                points.append(point)
    # Images decode on --decode-threads at once, by default one per core.
    return points, {"flags": flags, "decode_threads": os.cpu_count() or 1}


def edge_figures(flags: list[str], images: list[bytes], plan: Plan) -> list[dict[str, Any]]:
    """For each count of edge processes in the plan, a server with that many (otherwise as
    the first) at the most clients, one image per request: images/s, latency, GPU use, and
    the CPU of the core and of the edges (% of one core)."""
    from bench.scenarios.workers import edge_pids

    clients = max(plan.clients)
    figures = []
    for edges in plan.edges:
        with procs.temporary_server(
            [*flags, "--workers", str(edges)], prefix="batchserve-device-"
        ) as server:
            meters = [CpuMeter(pid) for pid in (server.process.pid, *edge_pids(server))]
            point = one_point(server.url, server.process.pid, images, 1, clients, plan.seconds)
            used = [meter.read() for meter in meters]
        point = {
            "workers": edges,
            **point,
            "core_cpu_pct": used[0]["server_cpu_pct"],
            "edges_cpu_pct": round(sum(u["server_cpu_pct"] for u in used[1:]), 1),
            "edge_reactors_cpu_pct": round(sum(u["reactor_cpu_pct"] for u in used[1:]), 1),
        }
        print(f"device: {point}", flush=True)
        figures.append(point)
    return figures


def limit(
    best: dict[str, Any], model: dict[str, float], decode_per_s: float, decode_threads: int
) -> dict[str, Any]:
    """How near each part was to its own limit at the best load point (1.0: at it), and
    the nearest named. The model's limit is its rate alone at the largest batch measured
    not above the point's mean batch."""
    sizes = sorted(int(size) for size in model)
    fitting = [size for size in sizes if size <= max(1.0, best["mean_batch"])] or sizes[:1]
    shares = {
        "model": best["images_per_s"] / model[str(fitting[-1])],
        "decode": best["images_per_s"] / (decode_per_s * decode_threads),
        "reactor": best["reactor_cpu_pct"] / 100.0,
        "load generator": best["generator_cpu_pct"] / (100.0 * GENERATORS),
    }
    return {
        "shares": {name: round(share, 2) for name, share in shares.items()},
        "nearest": max(shares, key=lambda name: shares[name]),
    }


def measure(backend: str, on_cpu: bool, quick: bool) -> dict[str, Any]:
    """The whole run; the numbers ``bench/results.json`` keeps under ``device``."""
    from bench.harness.images import demo_photos

    plan = Plan.of(quick)
    device = "cpu" if on_cpu else "gpu"
    images = demo_photos()
    model = model_figures(backend, device, plan)
    print(f"device: model alone {model}", flush=True)
    decode_per_s = offline.decode_rate(images, (160, 160), seconds=plan.model_s)
    search = search_figures(plan.items)
    points, server = server_figures(backend, device, images, plan)
    edges = edge_figures(server["flags"], images, plan)
    best = max(points, key=lambda p: p["images_per_s"])
    return {
        "device": device_name(on_cpu),
        "backend": backend,
        "quick": quick,
        "cores": os.cpu_count(),
        "model_images_per_s": model,
        "decode_per_s_per_thread": round(decode_per_s, 1),
        "search": search,
        "server": {**server, "generators": GENERATORS, "seconds": plan.seconds},
        "points": points,
        "edges": edges,
        "best": best,
        "limit": limit(best, model, decode_per_s, server["decode_threads"]),
    }
