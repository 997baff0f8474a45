"""Turns at decoding, handed out one image at a time in the order they were asked for.

The decode pool holds more threads than may decode at once: each request being read and
decoded has a thread of its own, and before each of its images it waits for a turn (one of
``slots``, the decode threads). A turn freed goes to the longest waiter, never back to the
thread that freed it, so requests' images interleave: a request of many slow images (within
its pixel budget, a hostile one decodes for up to its deadline) cannot hold the decoding
while an ordinary request waits. The ordinary one waits for one image of each request ahead
of it, not for all of their images.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Requests being read and decoded at once, per turn: how many may wait their turn before
#: a new request waits for a thread of the pool (first come, first served) instead.
REQUESTS_PER_TURN = 8
#: How often a waiter asks whether to give up (its client hung up, its deadline passed).
POLL_S = 0.1


def _carry_on() -> None:
    return None


class DecodeTurns:
    """``slots`` turns, taken with ``turn()`` around one image's decoding, first come first
    served (handed over, so a thread that gives one back and asks again queues)."""

    def __init__(self, slots: int, poll_s: float = POLL_S) -> None:
        self.slots = slots
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: deque[threading.Event] = deque()

    @property
    def waiting(self) -> int:
        """Threads waiting for a turn now."""
        with self._lock:
            return len(self._waiting)

    @contextmanager
    def turn(self, stop: Callable[[], None] = _carry_on) -> Iterator[None]:
        """Wait for a turn, hold it for the block, then hand it to the longest waiter.
        While it waits, ``stop()`` is called every ``poll_s``: what it raises gives the wait
        up (a request whose client hung up, or whose deadline passed, leaves the line)."""
        self._take(stop)
        try:
            yield
        finally:
            self._give_back()

    def _take(self, stop: Callable[[], None]) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            mine = threading.Event()
            self._waiting.append(mine)
        while not mine.wait(self._poll_s):  # set by the thread that hands its turn over
            try:
                stop()
            except BaseException:
                self._leave(mine)
                raise

    def _leave(self, mine: threading.Event) -> None:
        """Give up a place in the line; a turn handed over meanwhile goes on to the next."""
        with self._lock:
            if mine in self._waiting:
                self._waiting.remove(mine)
                return
        self._give_back()

    def _give_back(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1
