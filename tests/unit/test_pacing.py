"""RefusalPacer: refusals answered at once up to a rate tied to the model's, the rest
held their turn, never longer than their Retry-After."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from batchserve.http.pacing import BURST_S, MIN_RATE_PER_S, RefusalPacer


def pacer(images_per_s: float = 10.0, ratio: float = 3.0) -> tuple[RefusalPacer, Clock]:
    clock = Clock()
    clock.advance(100.0)
    return RefusalPacer(clock, lambda: images_per_s, ratio), clock


def test_a_second_of_refusals_at_the_rate_goes_at_once_then_each_waits_its_turn() -> None:
    p, _clock = pacer(images_per_s=10.0, ratio=3.0)  # 30 refusals a second
    burst = [p.delay_s(retry_after_s=60) for _ in range(int(30 * BURST_S) + 1)]
    assert burst == [0.0] * len(burst)
    waits = [p.delay_s(retry_after_s=60) for _ in range(3)]
    assert waits == pytest.approx([1 / 30, 2 / 30, 3 / 30])


def test_refusals_at_the_rate_are_never_held() -> None:
    p, clock = pacer(images_per_s=10.0, ratio=3.0)
    for _ in range(300):
        assert p.delay_s(retry_after_s=60) == 0.0
        clock.advance(1 / 30)


def test_a_wait_is_at_most_the_refusals_retry_after() -> None:
    p, _clock = pacer(images_per_s=10.0, ratio=1.0)
    waits = [p.delay_s(retry_after_s=2) for _ in range(100)]
    assert max(waits) == 2


def test_the_rate_follows_the_model_and_has_a_floor() -> None:
    rate = {"images_per_s": 100.0}
    clock = Clock()
    p = RefusalPacer(clock, lambda: rate["images_per_s"], 2.0)
    for _ in range(int(200 * BURST_S) + 1):
        assert p.delay_s(60) == 0.0
    assert p.delay_s(60) == pytest.approx(1 / 200)
    rate["images_per_s"] = 0.0  # a stalled model: the floor still answers
    assert p.delay_s(60) == pytest.approx(2 / 200)
    assert p.delay_s(60) == pytest.approx(2 / 200 + 1 / MIN_RATE_PER_S)


def test_ratio_zero_never_holds() -> None:
    p, _clock = pacer(ratio=0.0)
    assert all(p.delay_s(60) == 0.0 for _ in range(10_000))
