"""Graceful shutdown's bookkeeping: requests in flight, refusal once draining, the bound."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from batchserve.errors import NotReady
from batchserve.http.drain import InFlight


def fired(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_drain_fires_once_the_last_request_is_answered() -> None:
    clock, flight = Clock(), InFlight()
    flight.enter()
    flight.enter()
    done = fired(flight.drain(30, clock))
    flight.leave()
    assert done == []
    flight.leave()
    assert done == [True] and clock.getDelayedCalls() == []  # the timer is cancelled


def test_drain_gives_up_after_its_timeout() -> None:
    clock, flight = Clock(), InFlight()
    flight.enter()
    done = fired(flight.drain(5, clock))
    clock.advance(4.9)
    assert done == []
    clock.advance(0.1)
    assert done == [False]
    flight.leave()  # answered late: nothing fires twice
    assert done == [False]


def test_nothing_in_flight_drains_at_once_and_new_requests_are_refused() -> None:
    flight = InFlight()
    assert fired(flight.drain(5, Clock())) == [True]
    with pytest.raises(NotReady) as refused:
        flight.enter()
    assert refused.value.retry_after_s == 1 and flight.count == 0
