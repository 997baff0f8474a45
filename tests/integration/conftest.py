"""Fixtures that start the real server (a subprocess on 127.0.0.1, port 0) with the real
built-in model, and real photos shipped by scikit-image."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


@dataclass
class Server:
    """A running batchserve process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            raw = conn.getresponse()
            return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, *args: str) -> Server:
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
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
                str(tmp / "data"),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    port = None
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
        if found:
            port = int(found.group(1))
            break
        time.sleep(0.1)
    if port is None:
        process.kill()
        raise RuntimeError("server did not start:\n" + log_path.read_text())
    server = Server(process, port, log_path)
    while time.monotonic() < deadline and process.poll() is None:
        if server.request("GET", "/readyz").status == 200:
            return server
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server never became ready:\n" + server.log())


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("server"), "--max-delay-ms", "5")
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
