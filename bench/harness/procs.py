"""Processes under test, for benchmarks and integration tests alike: a ``batchserve serve``
process (``ServerProcess``), the Flask + gunicorn baselines, and what the kernel says about
a process: resident memory of its tree, CPU time per thread."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from batchserve.client import BatchserveError, Client, Retry


def probe_client(url: str) -> Client:
    """A client for polling a starting server: one short try per call, as the caller
    polls anyway."""
    return Client(url, timeout_s=2.0, retries=Retry(attempts=1))


class ServerProcess:
    """A ``batchserve serve`` process on 127.0.0.1 and a free port, for integration tests
    and benchmarks. ``start`` returns once ``/readyz`` answers 200; ``ready_s`` is the
    time from process start to ready."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, port: int, ready_s: float, log_path: Path
    ) -> None:
        self.process = process
        self.url = url
        self.port = port
        self.ready_s = ready_s
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        directory: Path,
        args: Sequence[str] = (),
        timeout_s: float = 300.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Self:
        """Start the server with its data dir and log under ``directory``. Its environment
        is this process's without any ``BATCHSERVE_*`` variable, plus ``env``; it runs in
        ``cwd`` (default: this process's)."""
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / "server.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
        environ.update(env or {})
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
                env=environ,
                cwd=cwd,
            )
        port = None
        client: Client | None = None
        try:
            while time.monotonic() - started < timeout_s and process.poll() is None:
                if client is None:
                    # The port the server picked is known only from its own announcement.
                    found = re.search(
                        r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text()
                    )
                    port = int(found.group(1)) if found else None
                    client = probe_client(f"http://127.0.0.1:{port}") if port else None
                elif port is not None and answers(client.ready):
                    return cls(process, client.url, port, time.monotonic() - started, log_path)
                time.sleep(0.05)
        finally:
            if client is not None:
                client.close()
        process.kill()
        process.wait()
        raise RuntimeError("server did not become ready:\n" + log_path.read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; return the exit status."""
        return stop_process(self.process, timeout_s)


@contextmanager
def temporary_server(
    args: Sequence[str], prefix: str = "batchserve-bench-", directory: Path | None = None
) -> Iterator[ServerProcess]:
    """A server with its data dir and log in ``directory`` (default: a new temporary one),
    stopped and the directory removed on leaving."""
    directory = directory or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        running = ServerProcess.start(directory, args)
        try:
            yield running
        finally:
            running.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """Stop ``process`` as an orchestrator would: SIGTERM, then SIGKILL after
    ``timeout_s``. Returns its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def answers(probe: Callable[[], bool]) -> bool:
    """Whether ``probe`` (``Client.ready``, ``Client.healthy``) says yes; a server that
    does not answer yet, or answers with an error, says no."""
    try:
        return probe()
    except BatchserveError:
        return False


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


@dataclass(frozen=True)
class ThreadCpu:
    """CPU time (user + system, seconds) of one thread of a process."""

    tid: int
    name: str  # the kernel's name of the thread (comm), at most 15 characters
    cpu_s: float


def thread_cpu(pid: int) -> list[ThreadCpu]:
    """Every live thread of ``pid`` with its CPU time so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # The name is in parentheses and may hold spaces: the fields follow the last ")".
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        threads.append(ThreadCpu(int(task.name), name, (utime + stime) / ticks))
    return threads


@dataclass
class Baseline:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_dir: Path

    def stop(self) -> None:
        stop_process(self.process, timeout_s=30)
        shutil.rmtree(self.log_dir, ignore_errors=True)


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
    with probe_client(url) as client:
        while time.monotonic() < deadline and process.poll() is None:
            # Every worker loads its own model: wait until several answers came back.
            ready += answers(client.healthy)
            if ready >= 3 * workers:
                time.sleep(10)  # workers load their models lazily on import: let all finish
                return Baseline(module, process, url, log.parent)
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"baseline {module} did not start:\n{log.read_text()[-2000:]}")


def start_bentoml(service: str, timeout_s: float = 180.0) -> Baseline:
    """``bentoml serve bench.baselines.SERVICE`` on 127.0.0.1, once its /readyz says so
    (its usage tracking off: the machine may have no network)."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="batchserve-bentoml-")) / "bentoml.log"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", BENTOML_DO_NOT_TRACK="true")
    command = [sys.executable, "-m", "bentoml", "serve", f"bench.baselines.{service}",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    with probe_client(url) as client:
        while time.monotonic() < deadline and process.poll() is None:
            if answers(client.ready):
                return Baseline(service, process, url, log.parent)
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"BentoML service {service} did not start:\n{log.read_text()[-2000:]}")
