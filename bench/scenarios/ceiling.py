"""The load generator's own ceiling (section 7 of RESULTS.md): ``GET /healthz`` of one
batchserve at 32 connections, by wrk (when installed) and by this generator with 1 and 2
processes, on the same cores as the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from typing import Any

from bench.harness import load, point, procs
from bench.harness.bodies import build_requests

CONNECTIONS = 32

#: wrk's ``done`` hook prints its own counts as JSON: nothing is read from its report text.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %d, "duration_us": %d}\\n',
                         summary.requests, summary.duration))
end
"""


def wrk_rate(url: str, duration_s: float) -> float | None:
    """Requests/s wrk sustained with one thread and ``CONNECTIONS`` connections; None
    when wrk is not installed."""
    if not shutil.which("wrk"):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        done = subprocess.run(
            ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration_s:g}s", "-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
        )
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    return round(float(counts["requests"]) / (float(counts["duration_us"]) / 1e6), 1)


def generator_rate(base: str, duration_s: float, processes: int) -> dict[str, Any]:
    """This generator, closed loop, ``CONNECTIONS`` clients in ``processes`` processes."""
    spec = load.LoadSpec(
        base + "/healthz",
        build_requests(base, "/healthz", []),
        duration_s=duration_s,
        warmup_s=2,
        concurrency=CONNECTIONS,
    )
    p = point.measure(base, spec, processes)
    return {
        "processes": processes,
        "achieved_per_s": p["achieved_per_s"],
        "p50_ms": p["p50_ms"],
        "p99_ms": p["p99_ms"],
    }


def measure(duration_s: float = 10.0) -> dict[str, Any]:
    with procs.temporary_server(["--no-demo"]) as running:
        wrk = wrk_rate(running.url + "/healthz", duration_s)
        ours = [generator_rate(running.url, duration_s, n) for n in (1, 2)]
    return {
        "duration_s": duration_s,
        "connections": CONNECTIONS,
        "wrk_per_s": wrk,
        "generator": ours,
    }
