"""The Batcher: turns single submissions into batches for one runner.

Items wait in a bounded queue. A batch is handed to the runner when any of these holds, and
fewer than ``max_inflight`` batches are already with the runner:

- the queue holds ``max_batch_size`` items (a full batch);
- the runner is idle (nothing in flight): a lone request pays no batching delay, and under
  load the queue fills while the previous batch computes;
- the oldest item has waited ``max_delay_s`` (only matters with ``max_inflight`` > 1).

A full batch may also go one ahead of ``max_inflight`` (``full_batch_ahead``): it waits in
the runner's own queue, so the model starts it the moment the previous batch ends instead
of idling until the reactor hears of that end (which, under load, is when the reactor is
busiest).

The queue has room for an item while it holds fewer than ``max_queue`` items and while the
wait it would have, at the rate recent batches ran, stays within ``WAIT_SHARE`` of the
deadline (``check_room``): when the model slows (a busy machine, a costlier model), the
queue shortens with it, so that what is admitted is answered in time instead of decoded,
queued and dropped at its deadline, work that takes the model's time from the rest.

Every item has a deadline: one still queued when it passes is dropped and fails with
DeadlineExceeded; one in flight fails at its deadline and its result is discarded. Cancelling
an item's Deferred (Klein does so when the client hangs up) removes it from the queue, and the
runner skips items no longer wanted when it starts a batch (``Batch.live_indices``). A runner
with a later stage tells the Batcher it can take the next batch early (``Batch.runner_free``);
the Batcher gives back its own slot. ``gather`` collects the results of several submissions
(a request's images) in order.

Plain Twisted: all methods run on the reactor thread; time comes from the injected clock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from batchserve.errors import ConfigError, DeadlineExceeded, InferenceFailed, Overloaded
from batchserve.settings import setting

In = TypeVar("In")
Out = TypeVar("Out")
In_co = TypeVar("In_co", covariant=True)
In_contra = TypeVar("In_contra", contravariant=True)
T = TypeVar("T")

log = Logger()

#: Tolerance for comparing float clock times, so a timer firing at its due time counts as due.
_EPSILON_S = 1e-9
#: The longest expected queue wait admitted, as a share of the deadline: the rest is left
#: for decoding, the batch itself, and the estimate's error.
WAIT_SHARE = 0.5


@dataclass(frozen=True)
class QueueState:
    """The queue as admission sees it at one moment: items queued, batches and items with
    the runner, and the moving averages of a batch's time and of its time per image."""

    queued: int
    inflight_batches: int
    inflight_items: int
    image_s: float
    batch_s: float

    def retry_after_s(self, policy: BatchPolicy) -> int:
        """Whole seconds a rejected client should wait: the time to drain the queue."""
        batches = self.queued / policy.max_batch_size + self.inflight_batches
        return max(1, math.ceil(batches * self.batch_s))

    def images_per_s(self, policy: BatchPolicy) -> float:
        """The rate the runner takes items when batches are full."""
        return policy.max_batch_size / self.batch_s

    def expected_wait_s(self, items: int) -> float:
        """How long the last of ``items`` queued now would wait for its batch to end: the
        images in flight and these, at the time per image recent batches took (a bound:
        the batch running may be nearly done)."""
        return (self.inflight_items + items) * self.image_s

    def refusal(
        self, policy: BatchPolicy, items: int, pending: int = 0, timeout_s: float | None = None
    ) -> str | None:
        """Why ``items`` more do not fit beside ``pending`` on their way (being decoded),
        or None when they do: within ``max_queue``, and within the wait the deadline allows
        (``WAIT_SHARE``): the policy's, or ``timeout_s``, the request's own, when shorter."""
        ahead = self.queued + pending
        deadline_s = min(policy.timeout_s, timeout_s or policy.timeout_s)
        if ahead + items > policy.max_queue:
            return f"queue full ({policy.max_queue} images)"
        if ahead and self.expected_wait_s(ahead) > WAIT_SHARE * deadline_s:
            # A request with nothing queued ahead of it is never refused so: its own images
            # are its own wait.
            return (
                f"queue full ({ahead} images wait about {self.expected_wait_s(ahead):.1f} s "
                f"of the {deadline_s:g} s deadline)"
            )
        return None


@dataclass(frozen=True)
class BatchPolicy:
    """When batches are formed, and the padded sizes the model runs them at. Times in
    seconds."""

    max_batch_size: int = setting(32, "largest batch handed to the model", at_least=1)
    max_delay_s: float = setting(
        0.005, "longest wait for a batch to fill while the model is busy, in seconds", at_least=0
    )
    max_queue: int = setting(
        512, "images waiting for the model before requests get 503", at_least=1
    )
    max_inflight: int = setting(1, "batches handed to the inference thread at once", at_least=1)
    full_batch_ahead: bool = setting(
        True,
        "hand a full batch to the inference thread while the previous one still runs (one "
        "beyond max_inflight), so the model never waits for the reactor between full batches",
    )
    timeout_s: float = setting(10.0, "per-request deadline in seconds (504 after)", above=0)
    batch_sizes: str = setting(
        "",
        "comma-separated padded batch sizes (default: 1, 2, 4, ... up to max_batch_size; "
        "with --backend openvino, or torch without --jit-compile, which take any size, every "
        "size: no padding)",
    )

    def __post_init__(self) -> None:
        try:
            sizes = self.padded_batch_sizes()
        except ValueError as e:
            raise ConfigError(f"batch_sizes must be integers: {e}") from e
        if sizes[0] < 1:
            raise ConfigError("batch_sizes must be positive")

    def padded_batch_sizes(self, any_size: bool = False) -> list[int]:
        """The batch sizes the model is compiled for, ascending; the largest is
        ``max_batch_size``. Unless ``batch_sizes`` says: powers of two, or, for a model
        that runs any batch size at no extra cost (``any_size``), every size (a batch of 20
        padded to 32 would compute 12 images for nothing)."""
        if self.batch_sizes.strip():
            sizes = {int(s) for s in self.batch_sizes.split(",") if s.strip()}
        elif any_size:
            sizes = set(range(1, self.max_batch_size + 1))
        else:
            sizes = {1 << i for i in range(self.max_batch_size.bit_length())}
        sizes.add(self.max_batch_size)
        return sorted(s for s in sizes if s <= self.max_batch_size)


class _Item(Generic[In, Out]):
    __slots__ = ("deadline", "deferred", "done", "enqueued_s", "payload")

    def __init__(self, payload: In, enqueued_s: float) -> None:
        self.payload = payload
        self.enqueued_s = enqueued_s
        self.deferred: Deferred[Out] | None = None
        self.deadline: IDelayedCall | None = None
        # Set on the reactor thread; a runner's thread reads it as it starts a frozen batch.
        self.done = False


class Batch(Generic[In_co]):
    """A batch handed to a runner: ``payloads[i]`` is the input of item ``i``.

    ``runner_free`` fires (on the reactor thread) when the runner can take the next batch
    before this one's results are in: a runner with a later stage (the index) fires it once
    its first stage (the model) is done, and the Batcher then starts the next batch. A runner
    that never fires it is free when its results are."""

    def __init__(
        self,
        items: Sequence[_Item[Any, Any]],
        payloads: list[In_co] | None = None,
        runner_free: Deferred[None] | None = None,
    ) -> None:
        self._items = items
        self.payloads: list[In_co] = (
            payloads if payloads is not None else [item.payload for item in items]
        )
        self.runner_free: Deferred[None] = runner_free if runner_free is not None else Deferred()
        self._frozen_live: list[int] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def free(self) -> None:
        """Say that the runner can take the next batch (reactor thread; once is enough)."""
        if not self.runner_free.called:
            self.runner_free.callback(None)

    def map(self, fn: Callable[[In_co], T]) -> Batch[T]:
        """The same items (same liveness, same ``runner_free``) with ``fn`` applied to each
        payload."""
        return Batch(self._items, [fn(p) for p in self.payloads], self.runner_free)

    def live_indices(self) -> list[int]:
        """Indices of the items still wanted (not cancelled, not expired). A frozen batch
        reads them again when its runner starts it (an item dropped while the batch waited
        behind another is skipped); reading ``done`` from the runner's thread is a plain
        attribute read, and an item dropped while its batch starts is computed all the
        same, its result discarded by the Batcher."""
        frozen = self._frozen_live
        candidates = range(len(self._items)) if frozen is None else frozen
        return [i for i in candidates if not self._items[i].done]

    def frozen(self) -> Batch[In_co]:
        """This batch as it stands now, for another thread: the items live now, of which
        ``live_indices`` gives those still live when asked. Its ``runner_free`` is its own:
        only the reactor fires the batch's."""
        copy = Batch(self._items, self.payloads)
        copy._frozen_live = self.live_indices()
        return copy


class BatchRunner(Protocol[In_contra, Out]):
    """Runs a whole batch; the seam between the Batcher and the model."""

    def run(self, batch: Batch[In_contra]) -> Deferred[Sequence[Out | Failure | None]]:
        """Return one result per item, in order; ``None`` only for items not live when the
        batch started; a Failure for an item that failed alone. The Deferred must fire on
        the reactor thread."""
        ...


class BatchObserver(Protocol):
    """Receives the Batcher's measurements (metrics.py implements it)."""

    def queue_size(self, items: int) -> None: ...

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None: ...

    def item_rejected(self, reason: str) -> None: ...


class _NoObserver:
    def queue_size(self, items: int) -> None:
        pass

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        pass

    def item_rejected(self, reason: str) -> None:
        pass


class Batcher(Generic[In, Out]):
    """Collects submitted items into batches for ``runner``, by ``policy``, on ``clock``."""

    def __init__(
        self,
        runner: BatchRunner[In, Out],
        policy: BatchPolicy,
        clock: IReactorTime,
        observer: BatchObserver | None = None,
    ) -> None:
        self._runner = runner
        self._policy = policy
        self._clock = clock
        self._observer: BatchObserver = observer or _NoObserver()
        self._queue: dict[int, _Item[In, Out]] = {}
        self._ids = itertools.count()
        self._inflight = 0
        self._timer: IDelayedCall | None = None
        self._flushing = False
        self._flush_again = False
        # Moving average of a batch's run time (from when the runner could start it, not
        # from when it was handed over ahead), for Retry-After and the rate estimate.
        self._batch_s = 0.05
        #: The moving average of a batch's time per image, and the images in flight.
        self._image_s = self._batch_s / policy.max_batch_size
        self._inflight_items = 0
        self._last_release_s = float("-inf")

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def queued(self) -> int:
        """Items waiting to be handed to the runner."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Batches handed to the runner and not finished."""
        return self._inflight

    def state(self) -> QueueState:
        """What admission reads of the queue now (an edge process gets copies of it)."""
        return QueueState(
            self.queued,
            self._inflight,
            self._inflight_items,
            self._image_s,
            self._batch_s,
        )

    def retry_after_s(self) -> int:
        """Whole seconds a rejected client should wait: the time to drain the queue."""
        return self.state().retry_after_s(self._policy)

    def images_per_s(self) -> float:
        """The rate the runner takes items when batches are full, as recent batches ran."""
        return self.state().images_per_s(self._policy)

    def count_rejection(self, reason: str) -> None:
        """Count an item refused before it reached the queue (for the metrics)."""
        self._observer.item_rejected(reason)

    def check_room(self, items: int, pending: int = 0, timeout_s: float | None = None) -> None:
        """Raise Overloaded (and count the rejection) unless ``items`` more fit in the queue
        beside ``pending`` items that are on their way to it (``QueueState.refusal``)."""
        state = self.state()
        reason = state.refusal(self._policy, items, pending, timeout_s)
        if reason is None:
            return
        self._observer.item_rejected("queue_full")
        raise Overloaded(f"{reason}; retry later", retry_after_s=state.retry_after_s(self._policy))

    def expected_wait_s(self, items: int) -> float:
        """How long the last of ``items`` queued now would wait (``QueueState``)."""
        return self.state().expected_wait_s(items)

    def submit(self, payload: In, timeout_s: float | None = None) -> Deferred[Out]:
        """Queue ``payload``; the Deferred fires with its result.

        Fails with Overloaded at once when the queue is full, with DeadlineExceeded when
        ``timeout_s`` (default: the policy's) passes first. Cancel it to drop the item.
        """
        if len(self._queue) >= self._policy.max_queue:
            self._observer.item_rejected("queue_full")
            return fail(
                Overloaded(
                    f"queue full ({self._policy.max_queue} items); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            )
        item: _Item[In, Out] = _Item(payload, self._clock.seconds())
        key = next(self._ids)
        item.deferred = Deferred(lambda _d: self._cancel(key, item))
        timeout = self._policy.timeout_s if timeout_s is None else timeout_s
        item.deadline = self._clock.callLater(timeout, self._expire, key, item)
        self._queue[key] = item
        self._observer.queue_size(len(self._queue))
        d = item.deferred
        self._flush()
        return d

    def _cancel(self, key: int, item: _Item[In, Out]) -> None:
        # The canceller runs before Twisted errbacks the Deferred with CancelledError.
        if item.done:
            return
        item.done = True
        self._stop_deadline(item)
        if self._queue.pop(key, None) is not None:
            self._observer.queue_size(len(self._queue))
        self._observer.item_rejected("cancelled")

    def _expire(self, key: int, item: _Item[In, Out]) -> None:
        item.deadline = None
        if item.done:
            return
        item.done = True
        queued = self._queue.pop(key, None) is not None
        if queued:
            self._observer.queue_size(len(self._queue))
        self._observer.item_rejected("deadline")
        where = "in the queue" if queued else "after its batch was handed to the model"
        assert item.deferred is not None
        item.deferred.errback(DeadlineExceeded(f"deadline passed {where}"))

    @staticmethod
    def _stop_deadline(item: _Item[In, Out]) -> None:
        if item.deadline is not None and item.deadline.active():
            item.deadline.cancel()
        item.deadline = None

    def _flush(self) -> None:
        # Re-entrancy guard: a runner that answers synchronously calls back into _flush.
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            self._flush_again = True
            while self._flush_again:
                self._flush_again = False
                self._flush_once()
        finally:
            self._flushing = False

    def _flush_once(self) -> None:
        policy = self._policy
        ahead = 1 if policy.full_batch_ahead else 0
        while self._queue and self._inflight < policy.max_inflight + ahead:
            now = self._clock.seconds()
            if len(self._queue) >= policy.max_batch_size:
                self._dispatch(now)
                continue
            if self._inflight >= policy.max_inflight:
                break  # only a full batch goes ahead
            due_s = next(iter(self._queue.values())).enqueued_s + policy.max_delay_s
            if self._inflight == 0 or now + _EPSILON_S >= due_s:
                self._dispatch(now)
                continue
            self._arm_timer(due_s - now)
            return
        self._disarm_timer()

    def _arm_timer(self, delay_s: float) -> None:
        if self._timer is not None and self._timer.active():
            if abs(self._timer.getTime() - (self._clock.seconds() + delay_s)) < _EPSILON_S:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(delay_s, self._on_timer)

    def _disarm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _dispatch(self, now: float) -> None:
        keys = list(itertools.islice(self._queue, self._policy.max_batch_size))
        items = [self._queue.pop(k) for k in keys]
        self._observer.queue_size(len(self._queue))
        self._observer.batch_started(len(items), [now - item.enqueued_s for item in items])
        self._inflight += 1
        self._inflight_items += len(items)
        batch: Batch[In] = Batch(items)
        # The slot is the Batcher's own: it is given back once, when the runner says it is
        # free for the next batch or, failing that, when the batch's results are in.
        # (Released whether it fires or fails: a cancelled ``runner_free`` frees it too.)
        batch.runner_free.addBoth(lambda _free: self._release_slot(now, len(items)))
        d = maybeDeferred(self._runner.run, batch)
        d.addCallbacks(self._deliver, self._fail, callbackArgs=(items,), errbackArgs=(items,))
        d.addBoth(lambda _result: batch.free())

    def _deliver(
        self, results: Sequence[Out | Failure | None], items: list[_Item[In, Out]]
    ) -> None:
        if len(results) != len(items):
            self._fail(
                Failure(
                    InferenceFailed(
                        f"runner returned {len(results)} results for {len(items)} items"
                    )
                ),
                items,
            )
            return
        for item, result in zip(items, results, strict=True):
            if item.done:
                continue
            item.done = True
            self._stop_deadline(item)
            assert item.deferred is not None
            if result is None:
                item.deferred.errback(InferenceFailed("runner skipped a live item"))
            elif isinstance(result, Failure):
                item.deferred.errback(result)  # this item alone failed
            else:
                item.deferred.callback(result)

    def _fail(self, failure: Failure, items: list[_Item[In, Out]]) -> None:
        log.failure("batch of {size} failed", failure, size=len(items))
        for item in items:
            if item.done:
                continue
            item.done = True
            self._stop_deadline(item)
            assert item.deferred is not None
            item.deferred.errback(failure)

    def _release_slot(self, started_s: float, size: int) -> None:
        self._inflight -= 1
        self._inflight_items -= size
        now = self._clock.seconds()
        elapsed = max(now - max(started_s, self._last_release_s), _EPSILON_S)
        self._last_release_s = now
        self._batch_s = 0.8 * self._batch_s + 0.2 * elapsed
        self._image_s = 0.8 * self._image_s + 0.2 * elapsed / size
        self._flush()


def gather(deferreds: Sequence[Deferred[T]]) -> Deferred[list[T]]:
    """The results of all ``deferreds`` (several submissions) in order; fails with the first
    failure and cancels the rest; cancelling the result cancels them all."""
    results: list[Any] = [None] * len(deferreds)
    remaining = [len(deferreds)]

    def cancel_all(_d: object = None) -> None:
        for d in deferreds:
            d.cancel()

    out: Deferred[list[T]] = Deferred(cancel_all)
    if not deferreds:
        out.callback([])
        return out

    def ok(result: T, i: int) -> None:
        results[i] = result
        remaining[0] -= 1
        if remaining[0] == 0 and not out.called:
            out.callback(results)

    def bad(failure: Failure, i: int) -> None:
        if not out.called:
            out.errback(failure)
            cancel_all()

    for i, d in enumerate(deferreds):
        d.addCallbacks(ok, bad, callbackArgs=(i,), errbackArgs=(i,))
    return out
