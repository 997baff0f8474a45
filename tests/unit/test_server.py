"""The builder: settings reach the objects it wires."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from batchserve.config import ServerSettings, ServeSettings
from batchserve.server import build
from batchserve.testing import FakeModel, SyncModelRunner


def test_the_decode_pool_gets_its_size_and_priority_from_the_settings() -> None:
    settings = ServeSettings(server=ServerSettings(decode_threads=3, decode_nice=7))
    server = build(settings, MemoryReactorClock(), model=SyncModelRunner(FakeModel()))
    decode, index = server.threads.pools
    assert (decode.min, decode.max, decode.threadFactory.nice) == (3, 3, 7)  # type: ignore[attr-defined]
    assert (index.min, index.max, index.threadFactory.nice) == (1, 1, 0)  # type: ignore[attr-defined]
    assert server.batcher.policy is settings.batching
