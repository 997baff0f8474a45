"""Refusals paced under a flood, so that clients who retry at once cannot take the CPU from
the model.

A refusal (503, queue full) is cheap, but not free: reading the request, answering it and
logging it take the reactor ~0.5 ms here. Clients that honour ``Retry-After`` come back
later; a flood of clients that retry the moment they are refused (a closed-loop load tool,
a retry loop with no back-off) sends as many requests as the server can refuse, and on a
small machine the reactor and the clients then take the cores the model needs: goodput
fell to 0.55 of the peak at 1,000 such clients on 2 cores.

So refusals are answered at once up to a rate, ``refusals_per_image`` times the images the
model takes per second, and the ones beyond it wait their turn (a leaky bucket, as GCRA
schedules it): the next request on that connection is not read until its refusal is
answered, so the flood slows to the rate and the reactor sleeps in between. A wait is never
longer than the refusal's own ``Retry-After`` (a client that honours it loses nothing).
A steady overload whose clients send at a fixed rate is refused at that rate, so with a
ratio above the overload's own (3x the peak refuses 2 images per image taken) its
refusals are never held.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

#: Refusals answered at once before any wait, as seconds of the paced rate.
BURST_S = 1.0
#: Waits shorter than this are sums of float intervals meeting the burst's edge: none.
_EPSILON_S = 1e-9
#: The paced rate never goes below this, whatever the model's estimate says.
MIN_RATE_PER_S = 20.0


class RefusalPacer:
    """When to answer each refusal: ``delay_s`` reserves its turn."""

    def __init__(
        self,
        clock: IReactorTime,
        images_per_s: Callable[[], float],
        refusals_per_image: float,
    ) -> None:
        self.clock = clock
        self._images_per_s = images_per_s
        self._ratio = refusals_per_image
        self._due_s = 0.0  # GCRA's theoretical arrival time of the next refusal

    def delay_s(self, retry_after_s: float) -> float:
        """Seconds to hold the refusal being made now before answering it: 0 within the
        rate, else its turn, at most ``retry_after_s``."""
        if self._ratio <= 0:
            return 0.0
        now = self.clock.seconds()
        interval_s = 1.0 / max(MIN_RATE_PER_S, self._ratio * self._images_per_s())
        self._due_s = max(self._due_s, now)  # when this refusal is due at the paced rate
        wait_s = self._due_s - now - BURST_S  # more than the burst ahead of time: it waits
        self._due_s += interval_s
        return min(wait_s, retry_after_s) if wait_s > _EPSILON_S else 0.0
