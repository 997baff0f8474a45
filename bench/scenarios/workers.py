"""Edge processes (``python -m bench workers``): ``--workers 2`` against ``--workers 1`` and
against one process (``--workers 0``), all three servers up at once and loaded in turn,
round after round (the machine's drift hits each alike); the ratios are medians of the
per-round ratios.

Phases:
- ``small``: 64x64 JPEGs through the front end's near-zero-cost model, so that what limits
  the server is its reactors (parsing, admitting, answering);
- ``photo``: 640x480 JPEGs through the same model (decoding weighs in);
- ``model``: the built-in model, 640x480 JPEGs at 32 clients (is the default no slower?).

Each round also records the CPU each part used per request, from /proc: every edge's
reactor (its main thread), the edges in all, the core, and the load generator.
``transport`` times the hand-off alone: an image into a shared slot, and a request's
frames to the core and back, against decoding the same image.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import load, procs
from bench.harness.bodies import build_requests
from bench.harness.images import sample_photos
from bench.scenarios import frontend

#: Each side's --workers.
SIDES = {"one process": 0, "1 edge": 1, "2 edges": 2}
#: The ratios quoted: (numerator, denominator).
PAIRS = [("2 edges", "1 edge"), ("2 edges", "one process"), ("1 edge", "one process")]
ROUTE = "/v1/embed"
#: Seconds of load before each round's measured seconds.
WARMUP_S = 1.0


def edge_pids(server: procs.ServerProcess) -> list[int]:
    """The live edges' process ids, from their "serving" lines (the latest per edge)."""
    found = dict(re.findall(r"edge (\d+) serving \(pid (\d+)\)", server.log()))
    return [int(pid) for pid in found.values()]


class CpuSample:
    """CPU seconds so far of a server's parts: edges' reactors, edges, core; and of this
    process's children and itself (the load generator)."""

    def __init__(self, server: procs.ServerProcess) -> None:
        core = server.process.pid
        edges = edge_pids(server)
        self.edge_reactors = sum(_main_thread(pid) for pid in edges)
        self.edges = sum(_process(pid) for pid in edges)
        self.core = _process(core)
        self.core_reactor = _main_thread(core)
        mine = os.times()
        self.generator = mine[0] + mine[1] + mine[2] + mine[3]


def _process(pid: int) -> float:
    return sum(t.cpu_s for t in procs.thread_cpu(pid))


def _main_thread(pid: int) -> float:
    return sum(t.cpu_s for t in procs.thread_cpu(pid) if t.tid == pid)


def one_round(
    server: procs.ServerProcess, images: list[bytes], clients: int, seconds: float
) -> dict[str, Any]:
    """One closed-loop round against ``server``, with what each part's CPU cost."""
    requests = build_requests(server.url, ROUTE, images, "raw")
    url = server.url + ROUTE
    # Warm up apart, so that the CPU counted is the measured requests' alone.
    load.run(load.LoadSpec(url, requests, WARMUP_S, warmup_s=0.0, concurrency=clients))
    spec = load.LoadSpec(url, requests, seconds, warmup_s=0.0, concurrency=clients)
    before = CpuSample(server)
    result = load.run(spec)
    after = CpuSample(server)
    done = max(1, len(result.ok()))

    def per_request_ms(part: str) -> float:
        used: float = getattr(after, part) - getattr(before, part)
        return round(1000 * used / done, 3)

    reactor = "edge_reactors" if edge_pids(server) else "core_reactor"
    return {
        "images_per_s": round(result.achieved_per_s(), 1),
        "p99_ms": round(result.percentile_ms(99), 1),
        "errors": result.errors(),
        "front_reactor_cpu_ms_per_request": per_request_ms(reactor),
        "edges_cpu_ms_per_request": per_request_ms("edges"),
        "core_cpu_ms_per_request": per_request_ms("core"),
        "generator_cpu_ms_per_request": per_request_ms("generator"),
    }


def side_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float:
        value: float = statistics.median(r[key] for r in rounds)
        return round(value, 3)

    errors: dict[str, int] = {}
    for r in rounds:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {
        "images_per_s": [r["images_per_s"] for r in rounds],
        "median_images_per_s": median("images_per_s"),
        "p99_ms": median("p99_ms"),
        "errors": errors,
        **{
            key: median(key)
            for key in (
                "front_reactor_cpu_ms_per_request",
                "edges_cpu_ms_per_request",
                "core_cpu_ms_per_request",
                "generator_cpu_ms_per_request",
            )
        },
    }


def alternate(
    servers: dict[str, procs.ServerProcess],
    images: list[bytes],
    rounds: int,
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    """``rounds`` rounds, each server in turn, the order turned by one each round."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    names = list(servers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(one_round(servers[name], images, clients, seconds))
            print(f"workers: {name}: {results[name][-1]}", flush=True)
    ratios = {
        f"{a}/{b}": [
            round(x["images_per_s"] / max(y["images_per_s"], 1e-9), 3)
            for x, y in zip(results[a], results[b], strict=True)
        ]
        for a, b in PAIRS
        if a in results and b in results
    }
    return {
        "clients": clients,
        "seconds": seconds,
        "rounds": rounds,
        "sides": {name: side_summary(done) for name, done in results.items()},
        "ratios": ratios,
        "median_ratios": {pair: round(statistics.median(r), 3) for pair, r in ratios.items()},
    }


def start_sides(directory: Path, flags: Sequence[str]) -> dict[str, procs.ServerProcess]:
    servers: dict[str, procs.ServerProcess] = {}
    try:
        for name, workers in SIDES.items():
            args = ["--no-demo", "--workers", str(workers), *flags]
            slug = name.replace(" ", "-")
            servers[name] = procs.ServerProcess.start(directory / slug, args)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def phases(
    directory: Path, flags: Sequence[str], plan: dict[str, tuple[list[bytes], int]], rounds: int,
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """Every phase of ``plan`` (name: images and clients) against one set of servers."""
    servers = start_sides(directory, flags)
    try:
        return {
            name: alternate(servers, images, rounds, clients, seconds)
            for name, (images, clients) in plan.items()
        }
    finally:
        for server in servers.values():
            server.stop()


def transport(photo: bytes, repeats: int = 2000) -> dict[str, float]:
    """Microseconds to hand one image to the core and get its answer, parts timed alone:
    copying it into a shared slot; framing and reading a one-image submit and its answer
    (a 1280-d embedding); the same for a request of 32 images; against decoding the photo."""
    import numpy as np

    from batchserve.models.batches import Prediction
    from batchserve.models.images import DecodeLimits, decode_image
    from batchserve.serving.batching import QueueState
    from batchserve.serving.pipeline import Outcome
    from batchserve.serving.records import EmbedTask
    from batchserve.serving.slots import Partition, RingShape, SlotRing, make_ring_file
    from batchserve.workers import frames

    shape = RingShape((160, 160, 3), 64, 1)
    part = Partition(SlotRing(make_ring_file(shape), shape), 0)
    image = decode_image(photo, (160, 160), DecodeLimits())
    state = QueueState(0, 1, 32, 0.01, 0.3)
    prediction = Prediction(np.ones(1280, np.float32), np.ones(19, np.float32))

    def frame_pair(n: int) -> None:
        ask = frames.dumps(("call", 1, "submit", (10.0, [(i, (), EmbedTask()) for i in range(n)])))
        frames.loads(ask)
        outcomes = [Outcome(prediction, model_s=0.01, batch_size=32) for _ in range(n)]
        frames.loads(frames.dumps(("done", 1, "", (outcomes, state))))

    def timed_us(fn: Any, n: int = repeats) -> float:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        return round(1e6 * (time.perf_counter() - started) / n, 1)

    def slot_round_trip() -> None:
        part.give_back(part.put([image]))

    return {
        "slot_copy_us_per_image": timed_us(slot_round_trip),
        "frames_us_per_request_of_1": timed_us(lambda: frame_pair(1)),
        "frames_us_per_request_of_32": timed_us(lambda: frame_pair(32), repeats // 10),
        "decode_us_per_image": timed_us(
            lambda: decode_image(photo, (160, 160), DecodeLimits()), repeats // 10
        ),
    }


def measure(rounds: int = 4, seconds: float = 6.0, model_rounds: int = 4) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-workers-"))
    try:
        small, photos = sample_photos(32, (64, 64)), sample_photos(32, (640, 480))
        tiny = frontend.build_model_apart(directory / "tiny.keras")
        # The model on one thread: near-zero cost should leave the cores to the front end.
        tiny_flags = [
            "--model", str(tiny), "--embedding-output", "embedding", "--intra-op-threads", "1"
        ]  # fmt: skip
        plan = {"small": (small, 64), "photo": (photos, 64)}
        numbers = phases(directory / "tiny", tiny_flags, plan, rounds, seconds)
        if model_rounds:
            model_plan = {"model": (photos, 32)}
            numbers |= phases(directory / "model", [], model_plan, model_rounds, seconds + 4)
        numbers["transport"] = transport(photos[0])
        numbers["tiny_model"] = frontend.MODEL
        numbers["cores"] = os.cpu_count()
        return numbers
    finally:
        shutil.rmtree(directory, ignore_errors=True)
