"""Fixtures that start the real server (a subprocess on 127.0.0.1, port 0) with the real
built-in model, and real photos shipped by scikit-image."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness.procs import ServerProcess
from tests.postgres import PostgresCluster, postgres_cluster, unavailable

READY_TIMEOUT_S = 180.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Server(ServerProcess):
    """The server under test, with a small HTTP client."""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> Response:
        return http_request(self.port, method, path, body, headers, timeout_s)


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Response:
    """One request to 127.0.0.1:``port`` on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        raw = conn.getresponse()
        return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
    finally:
        conn.close()


def system_binary(name: str, install: str) -> str:
    """The path of a system program a test needs; without it the test is skipped, saying how
    to install it (and fails in CI, where nothing may be skipped)."""
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed: {install}")
    return found


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    return Server.start(tmp, args, timeout_s=READY_TIMEOUT_S, env=env)


def stop_server(server: Server) -> int:
    return server.stop(timeout_s=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("server"), "--max-delay-s", "0.005")
    yield running
    stop_server(running)


def _jpeg(array: Any, quality: int = 90) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="session")
def photos() -> list[bytes]:
    """Real photos shipped by scikit-image, as JPEG bytes, with a few crops of each."""
    from skimage import data

    # These ship inside the wheel; others in skimage.data are downloaded on first use.
    originals = [
        data.chelsea(),
        data.astronaut(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
        data.camera(),
    ]
    out = []
    for image in originals:
        h, w = image.shape[:2]
        out.append(_jpeg(image))
        out.append(_jpeg(image[h // 8 : h - h // 8, w // 8 : w - w // 8]))
    return out


def metric(server: Server, sample: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics."""
    text = server.request("GET", "/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {sample} {labels} in /metrics")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> float:
    """Poll ``condition`` until it holds; return the time it first held (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of the test module's own (its tests may stop it)."""
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """A new empty database on the module's PostgreSQL."""
    return postgres.create_database()
