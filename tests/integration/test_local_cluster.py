"""deploy/local-cluster and deploy/nginx/batchserve.conf: two replicas sharing one PostgreSQL
catalog behind nginx, all on 127.0.0.1. nginx answers for ready replicas; an item written
through nginx is read by every replica directly within seconds, and so is its deletion; the
request id goes through nginx to the replica and back; the generated config passes
``nginx -t`` and differs from the shipped one only where the script may write; a second start
is refused; stop leaves no process behind. A replica logs the client nginx forwards for, not
nginx, nor an address the client wrote itself."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchserve.http.bodies import RequestLimits
from batchserve.serving.batching import BatchPolicy
from bench.harness.procs import free_port
from tests.integration.conftest import Response, http_request, system_binary, wait_until
from tests.postgres import require_postgres

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-cluster"
SHIPPED_CONF = REPO / "deploy" / "nginx" / "batchserve.conf"
PHOTO = REPO / "batchserve" / "data" / "demo" / "astronaut.jpg"
NGINX_INSTALL = "apt-get install -y nginx"

REPLICAS = 2  # the test machine has 2 cores
#: Bounds on the script: start includes loading the model in each replica (~10 s here).
READY_TIMEOUT_S = 240
START_TIMEOUT_S = READY_TIMEOUT_S + 60
#: stop waits up to 60 s for the replicas' drain, 15 s for nginx, 60 s for PostgreSQL.
STOP_TIMEOUT_S = 150
#: How long a write through one replica may take to be read on every other one.
REPLICATION_TIMEOUT_S = 10.0


@dataclass
class Cluster:
    directory: Path
    port: int
    replica_ports: list[int]

    def request(
        self,
        port: int,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        return http_request(port, method, path, body, headers, timeout_s=30)

    def via_nginx(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> Response:
        return self.request(self.port, method, path, body, headers)

    def replica_logs(self) -> str:
        return "".join(
            (self.directory / "logs" / f"replica-{i}.log").read_text(errors="replace")
            for i in range(1, REPLICAS + 1)
        )

    def pids(self) -> dict[str, int]:
        """The pids the script's files name: each replica, nginx's master, PostgreSQL's."""
        files = {
            f"replica-{i}": self.directory / "run" / f"replica-{i}.pid"
            for i in range(1, REPLICAS + 1)
        }
        files["nginx"] = self.directory / "nginx" / "nginx.pid"
        files["postgres"] = self.directory / "pg" / "postmaster.pid"
        return {name: int(path.read_text().split()[0]) for name, path in files.items()}


def local_cluster(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    # Without the caller's BATCHSERVE_* settings, as bench.harness.procs.ServerProcess starts
    # a server.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
    environ["PG_BIN"] = str(require_postgres())
    environ["NGINX_BIN"] = system_binary("nginx", NGINX_INSTALL)
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s, env=environ
    )


def logs_of(directory: Path) -> str:
    """The end of every log the cluster wrote, to explain a failure."""
    out = []
    for log in sorted((directory / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-20:]
        out.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(out)


@contextmanager
def started_cluster(prefix: str) -> Iterator[tuple[Path, int]]:
    """``deploy/local-cluster start`` of ``REPLICAS`` replicas in a new folder named from
    ``prefix``: (its folder, nginx's port); stopped and removed afterwards, whatever a test
    left running (a second stop only says "stopped")."""
    system_binary("nginx", NGINX_INSTALL)
    require_postgres()
    # Not pytest's tmp_path: under root, PostgreSQL runs as `postgres` and nginx's workers as
    # www-data, and neither may enter /tmp/pytest-of-root.
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    directory = root / "cluster"
    port = free_port()
    try:
        started = local_cluster(
            "start", "-n", str(REPLICAS), "--dir", str(directory), "--port", str(port),
            "--ready-timeout-s", str(READY_TIMEOUT_S), "--", "--no-demo",
            timeout_s=START_TIMEOUT_S,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr + logs_of(directory)
        yield directory, port
    finally:
        local_cluster("stop", "--dir", str(directory), timeout_s=STOP_TIMEOUT_S)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with started_cluster("batchserve-cluster-") as (directory, port):
        replica_ports = [
            int((directory / "run" / f"replica-{i}.port").read_text())
            for i in range(1, REPLICAS + 1)
        ]
        yield Cluster(directory, port, replica_ports)


def test_shipped_config_matches_the_servers_defaults() -> None:
    conf = SHIPPED_CONF.read_text()
    body_mib = re.search(r"^\s*client_max_body_size (\d+)m;", conf, re.M)
    assert body_mib is not None
    assert int(body_mib.group(1)) * 1024 * 1024 == RequestLimits().max_body_bytes
    read_s = re.search(r"^\s*proxy_read_timeout (\d+)s;", conf, re.M)
    assert read_s is not None
    # A replica answers 504 itself at its deadline; nginx must wait for that answer.
    assert BatchPolicy().timeout_s < int(read_s.group(1)) <= BatchPolicy().timeout_s + 5


def test_nginx_answers_once_every_replica_is_ready(cluster: Cluster) -> None:
    assert cluster.via_nginx("GET", "/readyz").status == 200
    status = local_cluster("status", "--dir", str(cluster.directory), timeout_s=30)
    assert status.returncode == 0, status.stdout + status.stderr
    for i, port in enumerate(cluster.replica_ports, start=1):
        url = rf"http://127\.0\.0\.1:{port}"
        line = rf"^replica-{i} +ready .* {url}  metrics {url}/metrics$"
        assert re.search(line, status.stdout, re.M), status.stdout
    assert f"nginx on http://127.0.0.1:{cluster.port}" in status.stdout


def test_an_item_written_through_nginx_is_read_by_every_replica(cluster: Cluster) -> None:
    item_id = f"x-{uuid.uuid4().hex[:8]}"
    added = cluster.via_nginx(
        "POST", f"/v1/items?id={item_id}", PHOTO.read_bytes(), **{"Content-Type": "image/jpeg"}
    )
    assert added.status == 200, added.body
    assert added.json()["added"] == [item_id]

    def every_replica_answers(status: int) -> bool:
        return all(
            cluster.request(port, "GET", f"/v1/items/{item_id}").status == status
            for port in cluster.replica_ports
        )

    wait_until(lambda: every_replica_answers(200), "every replica to read the item",
               timeout_s=REPLICATION_TIMEOUT_S)  # fmt: skip
    for port in cluster.replica_ports:
        assert cluster.request(port, "GET", f"/v1/items/{item_id}").json()["id"] == item_id

    deleted = cluster.via_nginx("DELETE", f"/v1/items/{item_id}")
    assert deleted.status == 200, deleted.body
    wait_until(lambda: every_replica_answers(404), "every replica to miss the deleted item",
               timeout_s=REPLICATION_TIMEOUT_S)  # fmt: skip


def test_nginx_passes_the_request_id_to_the_replica_and_back(cluster: Cluster) -> None:
    given = f"local-cluster-{uuid.uuid4().hex}"
    answered = cluster.via_nginx("GET", "/v1/items?limit=1", **{"X-Request-Id": given})
    assert answered.status == 200
    assert answered.headers["x-request-id"] == given
    # The replica's access line, not only nginx's header: the id reached the replica.
    wait_until(lambda: f"id={given}" in cluster.replica_logs(), "the replica to log the id",
               timeout_s=5)  # fmt: skip

    # Without one, nginx makes the id, and the replica logs and returns that same id.
    made = cluster.via_nginx("GET", "/v1/items?limit=1").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    wait_until(lambda: f"id={made}" in cluster.replica_logs(), "the replica to log nginx's id",
               timeout_s=5)  # fmt: skip


#: A client address on this host that no replica trusts as a proxy (the default trusts
#: 127.0.0.1 and ::1, nginx's address here): the loopback network is all of 127.0.0.0/8.
CLIENT = "127.0.0.2"


def from_client(port: int, path: str, headers: dict[str, str]) -> int:
    """The status of a GET to 127.0.0.1:``port`` sent from the address CLIENT."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(CLIENT, 0))
    try:
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_replica_logs_the_client_nginx_forwards_for_not_one_it_claims(
    cluster: Cluster,
) -> None:
    # Through nginx: the replica trusts nginx, and nginx appends the client's address to the
    # X-Forwarded-For the client sent; the address the client wrote itself is not believed.
    given = f"forwarded-{uuid.uuid4().hex}"
    spoofed = {"X-Request-Id": given, "X-Forwarded-For": "203.0.113.9"}
    assert from_client(cluster.port, "/v1/items?limit=1", spoofed) == 200
    wait_until(lambda: f"client={CLIENT} id={given}" in cluster.replica_logs(),
               "the replica to log the client's address", timeout_s=5)  # fmt: skip
    # Straight to a replica from an address it does not trust: the header is ignored.
    direct = f"direct-{uuid.uuid4().hex}"
    spoofed = {"X-Request-Id": direct, "X-Forwarded-For": "203.0.113.9"}
    assert from_client(cluster.replica_ports[0], "/v1/items?limit=1", spoofed) == 200
    wait_until(lambda: f"client={CLIENT} id={direct}" in cluster.replica_logs(),
               "the replica to log its peer's address", timeout_s=5)  # fmt: skip
    assert "client=203.0.113.9" not in cluster.replica_logs()


def test_the_generated_config_passes_nginx_t(cluster: Cluster) -> None:
    nginx_dir = cluster.directory / "nginx"
    checked = subprocess.run(
        [
            system_binary("nginx", NGINX_INSTALL), "-t",
            "-p", f"{nginx_dir}/",
            "-e", str(cluster.directory / "logs" / "nginx-error.log"),
            "-c", str(nginx_dir / "nginx.conf"),
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def unmarked_lines(conf: str) -> list[str]:
    """The lines of a batchserve.conf that deploy/local-cluster must copy unchanged: all but
    those marked ``local-cluster:`` and the replicas between the markers."""
    kept, between = [], False
    for line in conf.splitlines():
        if "local-cluster:replicas:" in line:
            between = line.strip().endswith(":start")
        elif not between and "# local-cluster:" not in line:
            kept.append(line)
    return kept


def test_the_generated_config_differs_from_the_shipped_one_only_where_marked(
    cluster: Cluster,
) -> None:
    generated = (cluster.directory / "nginx" / "batchserve.conf").read_text()
    assert unmarked_lines(generated) == unmarked_lines(SHIPPED_CONF.read_text())
    servers = re.findall(r"^\s*server (127\.0\.0\.1:\d+) (.*);$", generated, re.M)
    assert [address for address, _ in servers] == [
        f"127.0.0.1:{port}" for port in cluster.replica_ports
    ]
    assert {rest for _, rest in servers} == {"max_fails=3 fail_timeout=10s"}
    assert re.search(rf"^\s*listen 127\.0\.0\.1:{cluster.port};", generated, re.M)


def test_start_refuses_while_the_cluster_runs(cluster: Cluster) -> None:
    before = cluster.pids()
    again = local_cluster(
        "start", "-n", str(REPLICAS), "--dir", str(cluster.directory),
        "--port", str(free_port()), timeout_s=60,
    )  # fmt: skip
    assert again.returncode != 0
    assert "already running" in again.stderr
    assert cluster.pids() == before
    assert cluster.via_nginx("GET", "/readyz").status == 200


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and its descendants, each with its start time (field 22 of /proc/PID/stat),
    which tells a process from a later one given the same pid."""
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        started = start_time(current)
        if started is None:
            continue
        found[current] = started
        for task in Path(f"/proc/{current}/task").iterdir():
            pending.extend(int(c) for c in (task / "children").read_text().split())
    return found


def start_time(pid: int) -> str | None:
    """The start time of a live process; None when it is gone or a zombie (this machine's
    init may not reap the processes a daemon leaves to it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def test_stop_leaves_no_process_behind(cluster: Cluster) -> None:
    processes: dict[int, str] = {}
    for name, pid in cluster.pids().items():
        tree = process_tree(pid)
        assert tree, f"{name} (pid {pid}) is not running before stop"
        processes.update(tree)
    assert len(processes) > len(cluster.pids())  # nginx's worker, PostgreSQL's helpers

    stopped = local_cluster("stop", "--dir", str(cluster.directory), timeout_s=STOP_TIMEOUT_S)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    left = {pid for pid, started in processes.items() if start_time(pid) == started}
    assert not left, f"still running after stop: {sorted(left)}"
    status = local_cluster("status", "--dir", str(cluster.directory), timeout_s=30)
    assert status.returncode == 3, status.stdout
    assert "not running" in status.stdout
    with pytest.raises(ConnectionRefusedError):
        cluster.via_nginx("GET", "/readyz")
