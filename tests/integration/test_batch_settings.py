"""The batching settings, given as flags, environment variables or a TOML file, observed
from outside a real server: ``max_queue`` (503 + Retry-After exactly past the bound),
``timeout_s`` (504, and the model never sees an expired image) and ``max_delay_s`` (how
long a lone image waits for company while the model is busy).

The server serves a gated SavedModel (gated_model.py): the test closes the gate to hold the
model busy, so every step waits for an event the server reports, never for a guessed time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from batchserve.testing import encode_image
from tests.integration.conftest import (
    Response,
    Server,
    metric,
    start_server,
    stop_server,
    wait_until,
)
from tests.integration.gated_model import GatedModel, build_gated_model

FORMS = ("flags", "env", "toml")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> GatedModel:
    return build_gated_model(tmp_path_factory.mktemp("gated"))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


def start_with(
    tmp: Path, model: GatedModel, form: str, settings: dict[str, int | float | bool]
) -> Server:
    """The server on ``model`` with ``settings`` given in ``form``."""
    args = ["--model", str(model.path), "--no-demo"]
    env: dict[str, str] = {}
    if form == "flags":
        for name, value in settings.items():
            flag = name.replace("_", "-")
            if isinstance(value, bool):
                args.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                args += [f"--{flag}", str(value)]
    elif form == "env":
        env = {f"BATCHSERVE_{name.upper()}": _text(value) for name, value in settings.items()}
    else:
        path = tmp / "batchserve.toml"
        path.write_text("".join(f"{name} = {_text(v)}\n" for name, v in settings.items()))
        args += ["--config", str(path)]
    model.open()
    return start_server(tmp / "server", *args, env=env)


def _text(value: int | float | bool) -> str:
    """A setting's value as an environment variable or TOML writes it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def send(pool: ThreadPoolExecutor, server: Server, image: bytes) -> Future[Response]:
    return pool.submit(
        server.request, "POST", "/v1/embed", image, {"Content-Type": "image/png"}, 120.0
    )


def image(n: int) -> bytes:
    return encode_image(fmt="PNG", size=(32, 32), colour=(n * 40 % 256, 90, 200))


@pytest.mark.parametrize("form", FORMS)
def test_max_delay_and_max_queue_are_observed_from_outside(
    form: str, model: GatedModel, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    server = start_with(
        tmp_path,
        model,
        form,
        # Two batches may be with the model at once, so a lone image waits max_delay_s for
        # company instead of going at once, and no third goes ahead of them; a deadline far
        # away.
        {
            "max_queue": 3,
            "max_delay_s": 0.4,
            "max_inflight": 2,
            "full_batch_ahead": False,
            "max_batch_size": 2,
            "timeout_s": 120,
        },
    )
    try:
        model.close()
        started = len(model.calls())
        first = send(pool, server, image(0))
        model.wait_for_calls(started + 1)  # the model holds the first image at its gate

        batches = metric(server, "batchserve_batch_size_count")
        waits = metric(server, "batchserve_queue_wait_seconds_sum")
        sent = time.monotonic()
        lone = send(pool, server, image(1))
        handed_over = wait_until(
            lambda: metric(server, "batchserve_batch_size_count") == batches + 1,
            "the lone image handed over",
        )
        # It was handed over no sooner than max_delay_s after it was sent, and not 1000
        # times later (a unit slip); the server's own measure of its wait agrees.
        assert 0.4 <= handed_over - sent < 30.0
        waited = metric(server, "batchserve_queue_wait_seconds_sum") - waits
        assert 0.4 <= waited < 30.0

        # Both batch slots are now taken: images queue up to max_queue, then 503.
        queued = [send(pool, server, image(n)) for n in range(2, 5)]
        wait_until(lambda: metric(server, "batchserve_queue_items") == 3, "three images queued")
        refused = server.request("POST", "/v1/embed", image(5), {"Content-Type": "image/png"})
        assert refused.status == 503, refused.body
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        assert metric(server, "batchserve_queue_items") == 3
        assert metric(server, "batchserve_rejected_total", reason="queue_full") == 1

        model.open()
        answers = [f.result(timeout=120) for f in [first, lone, *queued]]
        assert [a.status for a in answers] == [200] * 5
        # The first, the lone one, then the queue as a full batch and a rest; the refused
        # image never reached the model.
        assert model.calls()[started:] == [1, 1, 2, 1]
    finally:
        model.open()
        stop_server(server)


@pytest.mark.parametrize("form", FORMS)
def test_timeout_s_is_the_deadline_and_expired_images_never_reach_the_model(
    form: str, model: GatedModel, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    # No batch goes ahead of the one at the model: the second image waits in the queue.
    settings = {"timeout_s": 1.5, "max_batch_size": 1, "full_batch_ahead": False}
    server = start_with(tmp_path, model, form, settings)
    try:
        model.close()
        started = len(model.calls())
        sent = time.monotonic()
        busy = send(pool, server, image(0))
        model.wait_for_calls(started + 1)
        waiting = send(pool, server, image(1))

        expired = waiting.result(timeout=60)  # a one-hour deadline would time out here
        assert time.monotonic() - sent >= 1.5
        assert expired.status == 504, expired.body
        assert expired.json()["error"]["code"] == "deadline_exceeded"
        assert "in the queue" in expired.json()["error"]["message"]
        held = busy.result(timeout=60)
        message = held.json()["error"]["message"]
        assert held.status == 504 and "after its batch was handed to the model" in message

        model.open()
        # A later image is computed; the expired one, queued before it, never was.
        later = server.request("POST", "/v1/embed", image(2), {"Content-Type": "image/png"})
        assert later.status == 200, later.body
        assert model.calls()[started:] == [1, 1]
        assert metric(server, "batchserve_rejected_total", reason="deadline") == 2
    finally:
        model.open()
        stop_server(server)
