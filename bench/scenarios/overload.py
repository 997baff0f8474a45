"""Overload: offer three times the saturation rate, then flood with 1,000 clients that
retry at once, and see what holds.

The peak is measured on the same server (closed loop, 64 clients); then each round offers
3x the last peak (open loop), lets 1,000 closed-loop clients ignore Retry-After
(``flood.py``), and measures the peak again; a round is judged against the mean of the
peaks on either side of it. What must hold: no crash; resident memory bounded (sampled
every second); goodput (answers within the request deadline) at least 90% of the peak in
both;
every rejection a fast 503 carrying ``Retry-After`` (checked by a probe once a second,
beside the load); accepted requests done within their deadline.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from batchserve.client import BatchserveError, Client, Retry
from bench.harness import load, procs, scrape
from bench.harness.bodies import build_requests
from bench.scenarios import flood

#: Clients of the flood phase: the count a reviewer tried with hey.
FLOOD_CLIENTS = 1000
#: What each round reports beside the median round's whole figures.
ROUND_KEYS = (
    "peak_per_s",
    "peaks_per_s",
    "goodput_per_s",
    "goodput_of_peak",
    "rejected_p99_ms",
    "probe_503_max_ms",
    "flood_ok_per_s",
    "flood_goodput_of_peak",
    "flood_held_per_s",
)


@dataclass
class Watch:
    """Samples the server's memory and probes it once a second, on a thread."""

    pid: int
    port: int
    body: bytes
    rss: list[int] = field(default_factory=list)
    probes: list[tuple[int, bool, float]] = field(default_factory=list)  # status, Retry-After, s
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join(30)

    def _run(self) -> None:
        # One attempt per probe: a retried 503 would hide the rejection being checked.
        url = f"http://127.0.0.1:{self.port}"
        with Client(url, timeout_s=30.0, retries=Retry(attempts=1)) as client:
            while not self._stop.wait(1.0):
                self.rss.append(procs.tree_rss_bytes(self.pid))
                self.probes.append(probe(client, self.body))


def probe(client: Client, image: bytes) -> tuple[int, bool, float]:
    """One ``POST /v1/embed`` of ``image``: its status (0: no answer), whether it said when
    to come back (``Retry-After``), and its seconds."""
    started = time.perf_counter()
    try:
        client.embed(image)
    except BatchserveError as e:
        return e.status, e.retry_after_s is not None, time.perf_counter() - started
    return 200, False, time.perf_counter() - started


def model_figures(view: scrape.ServerView, seconds: float) -> dict[str, float]:
    """The model's share of a run as the server saw it: time per image, fraction busy."""
    return {
        "model_ms_per_image": round(1000.0 * view.inference_s / view.images, 2)
        if view.images
        else 0.0,
        "model_busy": round(view.inference_s / seconds, 3) if seconds else 0.0,
    }


def summarise(
    result: load.LoadResult, peak: float, deadline_s: float, watch: Watch, alive: bool
) -> dict[str, Any]:
    """The overload figures from the samples of the run and the watcher's."""
    measured = result.measured()
    duration = result.spec.duration_s
    ok = [s.latency_s for s in measured if s.status == 200]
    rejected = sum(1 for s in measured if s.status == 503)
    other = sorted({s.status for s in measured} - {200, 503})
    goodput = result.goodput_per_s(deadline_s)
    probed_503 = [p for p in watch.probes if p[0] == 503]
    return {
        "peak_per_s": round(peak, 1),
        "offered_per_s": result.spec.rate,
        "goodput_per_s": round(goodput, 1),
        "goodput_of_peak": round(goodput / peak, 3) if peak else 0.0,
        "ok_p50_ms": round(result.percentile_ms(50), 1),
        "ok_p99_ms": round(result.percentile_ms(99), 1),
        "ok_max_ms": round(1000.0 * max(ok), 1) if ok else float("nan"),
        "deadline_ms": 1000.0 * deadline_s,
        "rejected_per_s": round(rejected / duration, 1),
        "rejected_p50_ms": round(result.percentile_ms(50, status=503), 1),
        "rejected_p99_ms": round(result.percentile_ms(99, status=503), 1),
        "other_statuses": {str(s): sum(1 for m in measured if m.status == s) for s in other},
        "probe_503s": len(probed_503),
        # The probe's own client, one request at a time beside the load: a 503's time as a
        # client that is not the flooding generator sees it.
        "probe_503_p50_ms": round(1000 * statistics.median(p[2] for p in probed_503), 1)
        if probed_503
        else float("nan"),
        "probe_503_max_ms": round(1000 * max(p[2] for p in probed_503), 1)
        if probed_503
        else float("nan"),
        "probe_503s_with_retry_after": sum(1 for p in probed_503 if p[1]),
        "rss_start_mib": round(watch.rss[0] / 2**20) if watch.rss else 0,
        "rss_max_mib": round(max(watch.rss) / 2**20) if watch.rss else 0,
        "rss_end_mib": round(watch.rss[-1] / 2**20) if watch.rss else 0,
        "server_alive": alive,
    }


def peak_phase(running: procs.ServerProcess, requests: list[bytes]) -> Peak:
    """The peak (closed loop, 64 clients, 10 s after 3 s of warm-up) and the model's share
    of it."""
    before = scrape.scrape(running.url)
    started = time.perf_counter()
    spec = load.LoadSpec(running.url + "/v1/embed", requests, 10, warmup_s=3, concurrency=64)
    peak = load.run(spec).achieved_per_s()
    view = scrape.difference(before, scrape.scrape(running.url))
    return Peak(peak, model_figures(view, time.perf_counter() - started))


def overload_phase(
    running: procs.ServerProcess,
    requests: list[bytes],
    probe: bytes,
    rate: float,
    seconds: float,
    deadline_s: float,
) -> tuple[load.LoadResult, Watch, dict[str, float] | None]:
    """Open loop at ``rate`` for ``seconds`` with the watcher beside it; the model's share
    of the run, when the server lived through it."""
    watch = Watch(running.process.pid, running.port, probe)
    spec = load.LoadSpec(
        running.url + "/v1/embed",
        requests,
        duration_s=seconds,
        warmup_s=2,
        rate=rate,
        max_connections=1024,
        timeout_s=deadline_s + 5,
    )
    before = scrape.scrape(running.url)
    started = time.perf_counter()
    thread = watch.start()
    try:
        # One process: 3x is far below its ceiling (bench README), and every core-second
        # the generator spends is taken from the server sharing its cores.
        result = load.run(spec, processes=1)
    finally:
        watch.stop(thread)
    if running.process.poll() is not None:
        return result, watch, None
    view = scrape.difference(before, scrape.scrape(running.url))
    return result, watch, model_figures(view, time.perf_counter() - started)


@dataclass
class Peak:
    """A peak phase: closed-loop images/s and the model's share of it."""

    per_s: float
    model: dict[str, float]


def one_round(
    running: procs.ServerProcess,
    images: list[bytes],
    requests: list[bytes],
    before: Peak,
    seconds: float,
    factor: float,
    deadline_s: float,
) -> tuple[dict[str, Any], Peak]:
    """``factor`` times the peak before it for ``seconds`` (open loop), a flood of
    ``FLOOD_CLIENTS`` closed-loop clients for ``seconds / 2``, then the peak again: one
    round's figures, taken against the mean of the peaks on either side (this machine's
    speed drifts by tens of percent over a minute; a peak taken once, before, would count
    the drift as the overload's), and the peak after, which the next round starts from."""
    result, watch, under = overload_phase(
        running, requests, images[0], factor * before.per_s, seconds, deadline_s
    )
    flooded: dict[str, Any] = {}
    if under is not None:
        flooded = flood.measure(running.url, images, FLOOD_CLIENTS, seconds / 2, deadline_s)
    alive = under is not None and running.process.poll() is None
    after = peak_phase(running, requests) if alive else before
    reference = (before.per_s + after.per_s) / 2
    figures: dict[str, Any] = {"seconds": seconds, "factor": factor}
    figures.update(summarise(result, reference, deadline_s, watch, alive=alive))
    if not alive or under is None:
        return figures, after
    figures["peaks_per_s"] = [round(before.per_s, 1), round(after.per_s, 1)]
    figures.update({f"peak_{k}": v for k, v in before.model.items()})
    figures.update(under)
    flooded["flood_goodput_of_peak"] = round(flooded["flood_ok_per_s"] / reference, 3)
    figures.update(flooded)
    return figures, after


def measure(
    images: list[bytes],
    seconds: float = 60.0,
    factor: float = 3.0,
    deadline_s: float = 10.0,
    rounds: int = 5,
) -> dict[str, Any]:
    """The peak, then ``rounds`` rounds on one server, each ``factor`` times the last peak
    for ``seconds / rounds``, a flood, and the peak again (a noisy machine's speed drifts
    between phases: each ratio is taken against the peaks on either side of its round).
    The figures of the round with the median 3x goodput, the median of each ratio, and
    every round's."""
    # Room for the generator's 1,024 connections and the flood's 1,000 beside the probe
    # and the scrapes of /metrics (the default, 1,000, would refuse those).
    flags = ["--no-demo", "--timeout-s", f"{deadline_s:g}", "--max-connections", "1100"]
    with procs.temporary_server(flags, prefix="batchserve-bench-overload-") as running:
        requests = build_requests(running.url, "/v1/embed", images)
        peak = peak_phase(running, requests)
        each = []
        for _ in range(rounds):
            figures, peak = one_round(
                running, images, requests, peak, seconds / rounds, factor, deadline_s
            )
            each.append(figures)
            if not figures["server_alive"]:
                break
    alive = [r for r in each if r["server_alive"]]
    if len(alive) < len(each):
        return {**each[len(alive)], "rounds": each}
    ordered = sorted(alive, key=lambda r: r["goodput_of_peak"])
    figures = dict(ordered[len(ordered) // 2])
    for ratio in ("goodput_of_peak", "flood_goodput_of_peak"):
        figures[ratio] = float(statistics.median(r[ratio] for r in alive))
    figures["seconds"] = seconds
    figures["rounds"] = [{k: r[k] for k in ROUND_KEYS if k in r} for r in each]
    return figures
