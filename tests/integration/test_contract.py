"""The API keeps its contract: schemathesis runs every operation of /openapi.json against
a live server (the built-in model, the demo photos) with generated, boundary and stateful
requests, and checks that none gets a 5xx and every response conforms to the document.
Bounded: a fixed seed and a few examples per operation and phase (~10 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from tests.integration.conftest import Server, start_server, stop_server

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: the run adds and deletes items."""
    running = start_server(tmp_path_factory.mktemp("contract"), "--max-delay-s", "0.005")
    yield running
    stop_server(running)


def test_every_example_in_the_document_succeeds(live: Server) -> None:
    document = live.request("GET", "/openapi.json").json()
    model = live.request("GET", "/v1/model").json()["name"]
    tried = 0
    for template, operations in document["paths"].items():
        path = template.replace("{name}", model)
        for method, operation in operations.items():
            for content_type, media in operation.get("requestBody", {}).get("content", {}).items():
                if "example" not in media:
                    continue
                body = live.request(
                    method.upper(),
                    path,
                    body=_json(media["example"]),
                    headers={"Content-Type": content_type},
                )
                assert body.status == 200, (method, path, body.body[:300])
                tried += 1
    assert tried >= 4


def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(
    live: Server, tmp_path: Path
) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(CONFIG),
        "run",
        f"http://127.0.0.1:{live.port}/openapi.json",
        "--checks",
        "all",
        "--workers",
        "1",
        "--seed",
        "1",
        "--max-examples",
        "25",
        "--generation-database",
        "none",
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        str(tmp_path / "junit.xml"),
    ]
    model = live.request("GET", "/v1/model").json()["name"]
    environment = {**os.environ, "BATCHSERVE_MODEL_NAME": model}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment
    )
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    tested = _junit_cases(tmp_path / "junit.xml")
    # Schemathesis leaves out the operation that serves the document it tests from.
    expected = {f"{m.upper()} {p}" for m, p in _operations(live)} - {"GET /openapi.json"}
    assert expected <= tested, expected - tested
    generated = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert generated is not None and generated[1] == generated[2]
    assert int(generated[1]) >= 10 * len(expected)
    assert live.request("GET", "/readyz").status == 200  # and the server goes on


def _operations(live: Server) -> list[tuple[str, str]]:
    document = live.request("GET", "/openapi.json").json()
    return [(m, p) for p, ops in document["paths"].items() for m in ops]


def _junit_cases(report: Path) -> set[str]:
    """The operations the JUnit report holds a test case for."""
    root = ElementTree.parse(report).getroot()
    return {case.attrib["name"] for case in root.iter("testcase")}


def _json(doc: Any) -> bytes:
    import json

    return json.dumps(doc).encode()
