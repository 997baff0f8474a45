"""When to send a call again, and after how long: on 503 (honouring ``Retry-After``) and on
connection errors, with exponential back-off and jitter otherwise. Pure decisions; the
clients do the sleeping, with the sleep function they were given."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from batchserve.client.errors import retry_after_s

#: What one attempt came to: an HTTP answer, or no answer.
Outcome = httpx.Response | httpx.TransportError

#: Failures that happen before a byte of the request is sent: every call may repeat them.
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Failures after the request may have been sent (and acted on): only calls that are safe
#: to repeat repeat them. A read timeout is not among them: the server may still be working
#: on it, and sending it again would only add to its load.
BROKEN = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@dataclass(frozen=True)
class Retry:
    """How many times a call is tried in all (``attempts=1``: never again), the first
    back-off in seconds (doubling after each attempt) and the longest wait, which caps a
    server's ``Retry-After`` too."""

    attempts: int = 3
    backoff_s: float = 0.1
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff_s < 0 or self.max_delay_s < 0:
            raise ValueError("backoff_s and max_delay_s must not be negative")


def backoff_s(policy: Retry, attempt: int, rng: Callable[[], float] = random.random) -> float:
    """The wait after failed attempt ``attempt`` (1-based): ``backoff_s * 2**(attempt-1)``
    capped by ``max_delay_s``, then jittered down to between half and all of that, so that
    clients that failed together do not come back together."""
    ceiling = min(policy.backoff_s * 2.0 ** (attempt - 1), policy.max_delay_s)
    return ceiling * (0.5 + 0.5 * rng())


def next_delay_s(
    policy: Retry,
    attempt: int,
    outcome: Outcome,
    repeatable: bool,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before trying again after attempt ``attempt`` came to ``outcome``,
    or None to stop there. A 503 means the server took nothing on, so every call may be
    repeated; a broken connection only a ``repeatable`` one."""
    if attempt >= policy.attempts:
        return None
    if isinstance(outcome, httpx.Response):
        if outcome.status_code != 503:
            return None
        after = retry_after_s(outcome.headers)
        if after is not None:
            return min(after, policy.max_delay_s)
    elif not (isinstance(outcome, UNSENT) or (repeatable and isinstance(outcome, BROKEN))):
        return None
    return backoff_s(policy, attempt, rng)
