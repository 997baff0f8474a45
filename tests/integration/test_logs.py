"""The server's log as it runs: JSON lines only (TensorFlow's native start-up lines turned
into log events, or dropped below debug), one access line per request with its id."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import start_server, stop_server

NATIVE_SCRIPT = """
import os, sys
from batchserve.serving import logs
logs.start_logging("info", "json")
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written\\n")
os.write(2, b"I0000 00:00:1795990913.700417   18051 port.cc:153] oneDNN custom operations\\n")
os.write(2, b"E0000 00:00:1795990913.700417   18051 gpu.cc:1] no device\\n")
os.write(2, b"a plain line from C\\n")
print("a last word from Python", file=sys.stderr)  # written as it is, at once
"""


def test_native_stderr_becomes_log_lines_and_info_noise_is_dropped() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NATIVE_SCRIPT], capture_output=True, text=True, timeout=60
    )
    written = done.stderr.splitlines()
    assert "a last word from Python" in written
    written.remove("a last word from Python")
    lines = [json.loads(line) for line in written]  # at exit, the pipe is drained
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("error", "native"),
        ("warn", "native"),
    ]
    assert lines[0]["message"] == "no device (gpu.cc:1)"
    assert lines[1]["message"] == "a plain line from C"


def test_a_json_log_is_all_json_with_an_access_line_per_request(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--log-format", "json", "--max-delay-s", "0.005")
    try:
        photo = (Path(__file__).parents[2] / "batchserve/data/demo/cat.jpg").read_bytes()
        headers = {"Content-Type": "image/jpeg", "X-Request-Id": "trace-42"}
        done = server.request("POST", "/v1/search?k=2", photo, headers)
        assert done.status == 200 and done.headers["x-request-id"] == "trace-42"
    finally:
        stop_server(server)
    lines = [json.loads(line) for line in server.log().splitlines()]
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in lines)
    assert not any(line["logger"] == "native" and line["level"] == "debug" for line in lines)
    [access] = [line for line in lines if line.get("request_id") == "trace-42"]
    assert access["route"] == "/v1/search" and access["status"] == 200
    assert access["images"] == 1 and access["batch_size"] == 1
    assert access["bytes_in"] == len(photo) and access["latency_ms"] > 0
    assert access["client"] == "127.0.0.1"
