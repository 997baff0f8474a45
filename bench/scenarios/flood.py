"""A flood: many clients, each sending its next request the moment the last is answered,
503 or not (a closed-loop load tool such as hey or wrk, or a retry loop with no back-off).

wrk runs it when installed (one thread, the way hey would be run beside the server);
without wrk, this project's generator in two processes, which spends more of the shared
cores itself. What counts: images answered per second, against the peak of the same round.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import load, scrape
from bench.harness.bodies import build_requests

#: wrk: cycle through the images (the server counts what it answered).
WRK_SCRIPT = """
local bodies = {}
for line in io.lines("%(list)s") do
  local f = io.open(line, "rb"); bodies[#bodies + 1] = f:read("*all"); f:close()
end
local next_body = 0
request = function()
  next_body = next_body %% #bodies + 1
  return wrk.format("POST", "/v1/embed", {["Content-Type"] = "image/jpeg"}, bodies[next_body])
end
"""


def start_wrk(
    folder: Path, url: str, images: list[bytes], clients: int, seconds: float, timeout_s: float
) -> subprocess.Popen[str]:
    """wrk, started: ``clients`` connections posting ``images`` to /v1/embed."""
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i}.jpg"
        path.write_bytes(image)
        paths.append(str(path))
    (folder / "list").write_text("\n".join(paths) + "\n")
    script = folder / "flood.lua"
    script.write_text(WRK_SCRIPT % {"list": folder / "list"})
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", f"--timeout={timeout_s:g}s"]
    return subprocess.Popen(
        [*command, "-s", str(script), url + "/v1/embed"], stdout=subprocess.PIPE, text=True
    )


def server_window(url: str, warmup_s: float, seconds: float) -> dict[str, float]:
    """What the server counted over ``seconds``, after ``warmup_s`` (the load running)."""
    time.sleep(warmup_s)
    before = scrape.scrape(url)
    time.sleep(seconds)
    after = scrape.scrape(url)
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def measure(
    url: str, images: list[bytes], clients: int, seconds: float, deadline_s: float
) -> dict[str, Any]:
    """The flood for ``seconds`` after 2 s of it unmeasured, one run of the load throughout
    (a client tool restarted between warm-up and measurement would hang up on every queued
    request): answers per second by status, as the server counted them, and the refusals it
    held back (``--refusals-per-image``)."""
    warmup_s = 2.0
    if shutil.which("wrk"):
        with tempfile.TemporaryDirectory(prefix="batchserve-flood-") as directory:
            wrk = start_wrk(
                Path(directory), url, images, clients, warmup_s + seconds + 1, deadline_s + 5
            )
            counted = server_window(url, warmup_s, seconds)
            wrk.communicate()
        tool = "wrk, 1 thread"
    else:
        requests = build_requests(url, "/v1/embed", images)
        spec = load.LoadSpec(
            url + "/v1/embed", requests, seconds + 1, warmup_s=warmup_s, concurrency=clients
        )
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(load.run, spec, 2)
            counted = server_window(url, warmup_s + 1.5, seconds)  # the processes' start
            running.result()
        tool = "this generator, 2 processes"
    by_status = {
        key.split('code="')[1].split('"')[0]: value / seconds
        for key, value in counted.items()
        if key.startswith("batchserve_requests_total{") and 'route="/v1/embed"' in key
    }
    return {
        "flood_clients": clients,
        "flood_tool": tool,
        "flood_ok_per_s": round(by_status.pop("200", 0.0), 1),
        "flood_refused_per_s": round(by_status.pop("503", 0.0), 1),
        "flood_other_per_s": {k: round(v, 1) for k, v in sorted(by_status.items()) if v},
        "flood_held_per_s": round(counted.get("batchserve_refusals_held_total", 0.0) / seconds, 1),
    }
