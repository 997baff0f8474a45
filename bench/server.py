"""Starting a batchserve process for a benchmark, on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    url: str
    ready_s: float
    log_path: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start(args: list[str], timeout_s: float = 300.0) -> RunningServer:
    """Start ``batchserve serve`` with ``args``; return once /readyz answers 200.
    ``ready_s`` is the time from process start to ready."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-"))
    log_path = directory / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batchserve.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--data-dir",
                str(directory / "data"),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = None
    while time.monotonic() - started < timeout_s and process.poll() is None:
        if url is None:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log_path.read_text())
            url = found.group(1) if found else None
        else:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return RunningServer(process, url, time.monotonic() - started, log_path)
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.05)
    process.kill()
    raise SystemExit("server did not become ready:\n" + log_path.read_text())
