"""Requests in flight, for a graceful shutdown: stop taking new ones, wait for the rest.

On SIGTERM the server stops listening, then ``drain`` refuses new requests on open
connections (503 with ``Retry-After``, so a load balancer retries them elsewhere) and fires
once the requests already taken have all been answered, or when the time is up.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from batchserve.errors import NotReady


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self._idle: list[Deferred[bool]] = []

    def enter(self) -> None:
        """Count one more request, or raise NotReady once draining."""
        if self.closing:
            raise NotReady("the server is shutting down", retry_after_s=1)
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                if not d.called:
                    d.callback(True)

    def drain(self, timeout_s: float, clock: IReactorTime) -> Deferred[bool]:
        """Refuse new requests from now on; fire True once none is in flight, or False
        after ``timeout_s`` with some still running."""
        self.closing = True
        if self.count == 0:
            return succeed(True)
        d: Deferred[bool] = Deferred()
        self._idle.append(d)
        timer = clock.callLater(timeout_s, self._give_up, d)

        def stop_timer(all_answered: bool) -> bool:
            if timer.active():
                timer.cancel()
            return all_answered

        return d.addCallback(stop_timer)

    @staticmethod
    def _give_up(d: Deferred[bool]) -> None:
        if not d.called:
            d.callback(False)
