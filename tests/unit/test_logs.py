"""The log: one timestamp per line, text or JSON; one access line per request with its id,
route, status, sizes, latency, images and batch; Python logging and TensorFlow's noise."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.resource import Resource

from batchserve.serving import logs
from tests.unit.test_api import RED, Harness


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def access_events(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in seen if e.get("log_namespace") == logs.ACCESS_NAMESPACE]


def test_a_request_id_is_the_clients_when_sane_or_a_new_one() -> None:
    assert logs.request_id(b"abc-123") == "abc-123"
    for bad in (None, b"", b"has space", b"x" * 129, b"\x00"):
        made = logs.request_id(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", made), bad
    assert logs.request_id(None) != logs.request_id(None)


def test_each_request_gets_one_access_line_with_its_fields(
    events: list[dict[str, Any]],
) -> None:
    h = Harness()
    headers = {"Content-Type": "image/jpeg", "X-Request-Id": "client-7"}
    status, response_headers, body = h.request("POST", "/v1/embed", RED, headers)
    assert status == 200 and response_headers["x-request-id"] == "client-7"
    [line] = access_events(events)
    assert line["request_id"] == "client-7" and line["method"] == "POST"
    assert line["route"] == "/v1/embed" and line["path"] == "/v1/embed"
    assert line["status"] == 200 and line["bytes_in"] == len(RED)
    assert line["bytes_out"] == len(json.dumps(body, separators=(",", ":")))
    assert line["images"] == 1 and line["batch_size"] == 1 and line["latency_ms"] >= 0
    assert line["log_level"] == LogLevel.info


def test_refusals_and_errors_are_logged_too_with_a_made_id(
    events: list[dict[str, Any]],
) -> None:
    h = Harness(ready=False)  # refused: the model is not loaded yet
    status, headers, _ = h.request("POST", "/v1/embed", RED, {"Content-Type": "image/jpeg"})
    assert status == 503 and re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    h.request("GET", "/nowhere")
    first, second = access_events(events)
    assert (first["route"], first["status"], first["images"]) == ("/v1/embed", 503, 0)
    assert first["request_id"] == headers["x-request-id"]
    assert (second["route"], second["status"]) == (None, 404)


def event(**fields: Any) -> dict[str, Any]:
    return {
        "log_time": 1_795_988_000.25,
        "log_level": LogLevel.info,
        "log_namespace": "batchserve.server",
        "log_format": "ready on {port}",
        "port": 8080,
        **fields,
    }


def test_a_text_line_has_one_timestamp() -> None:
    out = io.StringIO()
    logs.text_observer(out)(event())
    assert out.getvalue() == "2026-11-29T21:33:20.250Z info  batchserve.server: ready on 8080\n"


def test_a_json_line_carries_the_access_fields_as_keys() -> None:
    out = io.StringIO()
    fields = dict.fromkeys(logs.ACCESS_FIELDS, 1) | {"route": "/v1/embed"}
    access = event(log_namespace=logs.ACCESS_NAMESPACE, log_format=logs.ACCESS_FORMAT, **fields)
    logs.json_observer(out)(access)
    logs.json_observer(out)(event())
    access_line, plain = (json.loads(line) for line in out.getvalue().splitlines())
    assert access_line["time"] == "2026-11-29T21:33:20.250Z" and access_line["level"] == "info"
    assert access_line["logger"] == logs.ACCESS_NAMESPACE and access_line["route"] == "/v1/embed"
    assert set(logs.ACCESS_FIELDS) <= set(access_line)
    assert plain == {
        "time": "2026-11-29T21:33:20.250Z",
        "level": "info",
        "logger": "batchserve.server",
        "message": "ready on 8080",
    }


def test_the_level_filter_drops_what_is_below_it() -> None:
    out = io.StringIO()
    observer = logs.filtered(logs.text_observer(out), "warn")
    observer(event())
    observer(event(log_level=LogLevel.error, log_format="broken"))
    assert out.getvalue().count("\n") == 1 and "error batchserve.server: broken" in out.getvalue()


def test_python_logging_goes_to_the_twisted_log(events: list[dict[str, Any]]) -> None:
    handler = logs.TwistedHandler()
    logger = logging.getLogger("keras.test")
    logger.addHandler(handler)
    try:
        logger.warning("weights %s", "loaded")
    finally:
        logger.removeHandler(handler)
    [found] = [e for e in events if e.get("log_namespace") == "keras.test"]
    assert found["log_level"] == LogLevel.warn and found["text"] == "weights loaded"


def test_tensorflow_is_quiet_below_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    logs.quiet_framework_logs("debug")
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    logs.quiet_framework_logs("info")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert logging.getLogger("tensorflow").level == logging.ERROR


def test_twisted_internals_stay_out_of_the_log_below_debug() -> None:
    from twisted.logger import Logger, LogPublisher

    lines: dict[str, str] = {}
    for level in ("info", "debug"):
        out = io.StringIO()
        publisher = LogPublisher(logs.filtered(logs.OBSERVERS["text"](out), level))
        Logger(namespace="log_legacy", observer=publisher).info("_Site starting on 8080")
        Logger(namespace="twisted.internet.base", observer=publisher).info("Main loop ended")
        Logger(namespace="twisted.internet.base", observer=publisher).warn("a real warning")
        Logger(namespace="batchserve", observer=publisher).info("ready in 6 s")
        lines[level] = out.getvalue()
    assert "starting on" not in lines["info"] and "Main loop" not in lines["info"]
    assert "a real warning" in lines["info"] and "ready in 6 s" in lines["info"]
    assert "starting on" in lines["debug"] and "Main loop" in lines["debug"]


def test_the_site_does_not_log_its_factory_starting() -> None:
    from batchserve.http.site import make_site

    assert make_site(Resource(), 1000, access_log=False).noisy is False
