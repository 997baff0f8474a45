"""A throwaway PostgreSQL cluster for tests: ``initdb`` into a fresh folder, ``pg_ctl start``
on 127.0.0.1 at a free port (its unix socket inside the folder), one new database per test,
``stop()``/``start()`` for outage tests, and everything removed at the end.

PostgreSQL refuses to run as root: under root the binaries run as the ``postgres`` user
(``runuser -u postgres --``), which Debian's ``postgresql`` package creates. Without the
binaries the tests are skipped, saying how to install them (and fail in CI, where nothing may
be skipped), as ``system_binary`` does in tests/integration/conftest.py.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import count
from pathlib import Path
from typing import NoReturn

import pytest

INSTALL = "apt-get install -y postgresql"
START_TIMEOUT_S = 60


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else the newest Debian-style
    /usr/lib/postgresql/<version>/bin, else ``pg_config --bindir``."""
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).resolve().parent / "initdb").exists():
        return Path(on_path).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)],
    )
    if versions:
        return versions[-1].parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(
            subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        )
        if (bindir / "pg_ctl").exists():
            return bindir
    return None


def require_postgres() -> Path:
    """The binaries' folder, or skip (fail in CI) saying how to install them."""
    bindir = postgres_bindir()
    if bindir is None:
        unavailable(f"PostgreSQL (initdb, pg_ctl) is not installed: {INSTALL}")
    return bindir


def unavailable(reason: str) -> NoReturn:
    """A system component a test needs is missing: skip, saying why and how to install it;
    in CI, where nothing may be skipped, fail."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL server in ``root`` (data, log and socket), reachable as the
    ``postgres`` superuser without a password from 127.0.0.1."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = free_port()
        self._names = count(1)
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                runuser = None
            if runuser is None:
                pytest.fail("as root, PostgreSQL runs as the user 'postgres' with runuser: none")
            shutil.chown(root, "postgres", "postgres")
            self._as_postgres = [runuser, "-u", "postgres", "--"]

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as_postgres, str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stderr}\n{log}")

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        """Start the server (again, at the same port) and wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.root}"
        self._run(
            "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
            "-t", str(START_TIMEOUT_S), "-o", options,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends sessions cleanly, ``immediate`` is a crash."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w")

    def pids(self) -> list[int]:
        """The postmaster's pid (from the data folder's postmaster.pid), then those of its
        children: the backends and background processes, from /proc."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError):
                # The parent's pid is the second field after the command, which is in
                # parentheses and may hold spaces.
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(stat.parent.name))
        return [postmaster, *children]

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The server hung: the postmaster and all its processes stopped with SIGSTOP, as a
        stalled disk or host does (the kernel still accepts connections and answers
        keepalives; nothing else answers); continued with SIGCONT on exit, whatever
        happened."""
        stopped: list[int] = []
        try:
            postmaster = self.pids()[0]
            os.kill(postmaster, signal.SIGSTOP)  # first: it forks no more children
            stopped.append(postmaster)
            for pid in self.pids()[1:]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            yield
        finally:
            for pid in stopped:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            # The folder goes anyway.
            with suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A running throwaway cluster, removed on exit."""
    bindir = require_postgres()
    # Not pytest's tmp_path: its parents are private to this user, and the server may run
    # as 'postgres'.
    cluster = PostgresCluster(bindir, Path(tempfile.mkdtemp(prefix="batchserve-pg-")))
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
