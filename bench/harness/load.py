"""Load: open loop (constant or Poisson arrivals at a target rate) and closed loop (N
clients), over keep-alive connections, in one or several processes.

Open-loop latency is measured from each request's *scheduled* send time, so a server that
falls behind cannot hide its queueing (no coordinated omission): a request that waits for a
free connection, or is sent late because the generator is busy, counts that wait.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bench.harness.client import Connection, Target


@dataclass(frozen=True)
class Sample:
    """One request: when it was due (s from the start), its latency (s), its status (0: no
    response)."""

    due_s: float
    latency_s: float
    status: int


@dataclass(frozen=True)
class LoadSpec:
    url: str
    requests: list[bytes]  # full HTTP requests, encoded once
    duration_s: float
    warmup_s: float = 2.0
    rate: float = 0.0  # open loop: requests/s (all processes together)
    poisson: bool = False
    concurrency: int = 0  # closed loop: clients (all processes together)
    max_connections: int = 256  # open loop: connections per process
    seed: int = 0
    timeout_s: float = 15.0  # a request with no answer by then counts as status 0


@dataclass
class LoadResult:
    spec: LoadSpec
    samples: list[Sample] = field(default_factory=list)

    def measured(self) -> list[Sample]:
        """Requests due inside the measurement window (after the warm-up)."""
        low, high = self.spec.warmup_s, self.spec.warmup_s + self.spec.duration_s
        return [s for s in self.samples if low <= s.due_s < high]

    def ok(self) -> list[Sample]:
        return [s for s in self.measured() if s.status == 200]

    def achieved_per_s(self) -> float:
        """Successful answers that *completed* inside the window, per second: a server that
        falls behind an offered rate shows its real rate, not the offered one."""
        low, high = self.spec.warmup_s, self.spec.warmup_s + self.spec.duration_s
        done = sum(
            1 for s in self.samples if s.status == 200 and low <= s.due_s + s.latency_s < high
        )
        return done / self.spec.duration_s

    def goodput_per_s(self, slo_s: float) -> float:
        return sum(1 for s in self.ok() if s.latency_s <= slo_s) / self.spec.duration_s

    def errors(self) -> dict[str, int]:
        return {
            str(k): v
            for k, v in Counter(s.status for s in self.measured() if s.status != 200).items()
        }

    def percentile_ms(self, q: float, status: int = 200) -> float:
        """Latency percentile of the measured requests answered with ``status``."""
        latencies = [s.latency_s for s in self.measured() if s.status == status]
        return 1000.0 * float(np.percentile(latencies, q)) if latencies else float("nan")


async def _open_loop(spec: LoadSpec, share: float, seed: int, start_at: float) -> list[Sample]:
    target = Target.parse(spec.url)
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    rate = spec.rate * share
    end = spec.warmup_s + spec.duration_s
    due: list[float] = []
    t = rng.random() / rate  # a random phase, so processes do not send in lockstep
    while t < end:
        due.append(t)
        t += rng.expovariate(rate) if spec.poisson else 1.0 / rate
    idle: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
    for _ in range(spec.max_connections):
        idle.put_nowait(Connection(target))
    samples: list[Sample] = []
    origin = loop.time() + (start_at - time.time())

    async def send(i: int) -> int:
        conn = await idle.get()
        try:
            return await conn.send(spec.requests[i % len(spec.requests)])
        except BaseException:
            conn.close()  # a half-read response must not be read by the next request
            raise
        finally:
            idle.put_nowait(conn)

    async def one(i: int, at: float) -> None:
        delay = origin + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            status = await asyncio.wait_for(send(i), spec.timeout_s)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            status = 0
        samples.append(Sample(at, loop.time() - (origin + at), status))

    await asyncio.gather(*(one(i, at) for i, at in enumerate(due)))
    while not idle.empty():
        idle.get_nowait().close()
    return samples


async def _closed_loop(spec: LoadSpec, clients: int, offset: int, start_at: float) -> list[Sample]:
    target = Target.parse(spec.url)
    loop = asyncio.get_running_loop()
    origin = loop.time() + (start_at - time.time())
    end = origin + spec.warmup_s + spec.duration_s
    samples: list[Sample] = []

    async def client(index: int) -> None:
        conn = Connection(target)
        i = index
        await asyncio.sleep(max(0.0, origin - loop.time()))
        while (sent := loop.time()) < end:
            request = spec.requests[i % len(spec.requests)]
            try:
                status = await asyncio.wait_for(conn.send(request), spec.timeout_s)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                conn.close()
                status = 0
            samples.append(Sample(sent - origin, loop.time() - sent, status))
            i += clients
        conn.close()

    await asyncio.gather(*(client(offset + c) for c in range(clients)))
    return samples


def _run_share(args: tuple[LoadSpec, int, int, float]) -> list[tuple[float, float, int]]:
    spec, process, processes, start_at = args
    if spec.concurrency:
        clients = spec.concurrency // processes + (process < spec.concurrency % processes)
        if clients == 0:
            return []
        coro = _closed_loop(spec, clients, process, start_at)
    else:
        coro = _open_loop(spec, 1.0 / processes, spec.seed + process, start_at)
    return [(s.due_s, s.latency_s, s.status) for s in asyncio.run(coro)]


def run(spec: LoadSpec, processes: int = 1) -> LoadResult:
    """Run the load in ``processes`` processes (each its own event loop), all starting at
    the same moment; merge their samples."""
    start_at = time.time() + 0.5 + 0.5 * processes
    if processes == 1:
        parts = [_run_share((spec, 0, 1, start_at))]
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes) as pool:
            parts = pool.map(_run_share, [(spec, p, processes, start_at) for p in range(processes)])
    result = LoadResult(spec)
    for part in parts:
        result.samples.extend(Sample(*s) for s in part)
    return result
