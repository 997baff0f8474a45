"""Processes under test: the baselines under gunicorn, and the memory of a process tree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from batchserve.testing import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Linux /proc)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(
                int(line.split()[1]) * 1024
                for line in status.splitlines()
                if line.startswith("VmRSS:")
            )
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
        except (OSError, StopIteration):
            continue
    return total


@dataclass
class Baseline:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        stop_process(self.process, timeout_s=30)


def start_baseline(module: str, workers: int, timeout_s: float = 180.0) -> Baseline:
    """``gunicorn -w WORKERS bench.baselines.MODULE:app`` on 127.0.0.1, ready to serve."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="batchserve-baseline-")) / "gunicorn.log"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-w",
                str(workers),
                "-b",
                f"127.0.0.1:{port}",
                "--timeout",
                "120",
                f"bench.baselines.{module}:app",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    ready = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            # Every worker loads its own model: wait until several answers came back.
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                ready += response.status == 200
        except (urllib.error.URLError, OSError):
            pass
        if ready >= 3 * workers:
            time.sleep(10)  # workers load their models lazily on import: let all finish
            return Baseline(module, process, url)
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"baseline {module} did not start:\n{log.read_text()[-2000:]}")
