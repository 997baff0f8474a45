"""The Batcher's flush policy, limits, deadlines and cancellation, on a Clock with a fake
runner: no reactor, no threads, no sleep."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from batchserve.errors import DeadlineExceeded, InferenceFailed, Overloaded
from batchserve.serving.batching import Batch, Batcher, BatchPolicy
from batchserve.testing import FakeRunner, result_of


def make(**policy: Any) -> tuple[Batcher[int, int], FakeRunner[int], Clock]:
    defaults: dict[str, Any] = {
        "max_batch_size": 4,
        "max_delay_s": 0.010,
        "max_queue": 100,
        "max_inflight": 1,
        "full_batch_ahead": False,
        "timeout_s": 1.0,
    }
    defaults.update(policy)
    clock = Clock()
    runner: FakeRunner[int] = FakeRunner()
    return Batcher(runner, BatchPolicy(**defaults), clock), runner, clock


def has_fired(d: Deferred[Any]) -> bool:
    return bool(d.called)


def test_lone_item_goes_to_idle_runner_at_once() -> None:
    batcher, runner, _clock = make(max_delay_s=10.0)
    batcher.submit(1)
    assert runner.sizes == [1]  # no clock advance: no batching delay when idle


def test_items_wait_while_runner_busy_then_go_as_one_batch() -> None:
    batcher, runner, clock = make(max_batch_size=8)
    batcher.submit(0)
    for i in range(1, 6):
        batcher.submit(i)
    clock.advance(0.5)  # max_delay long past: still nothing, max_inflight is 1
    assert runner.sizes == [1]
    runner.complete()
    assert runner.sizes == [1, 5]
    assert runner.batches[1].payloads == [1, 2, 3, 4, 5]


def test_batch_never_exceeds_max_batch_size() -> None:
    batcher, runner, _clock = make(max_batch_size=4)
    batcher.submit(0)
    for i in range(10):
        batcher.submit(i)
    runner.complete()
    runner.complete()
    runner.complete()
    assert runner.sizes == [1, 4, 4, 2]


def test_full_batch_goes_at_once_when_a_slot_is_free() -> None:
    batcher, runner, _clock = make(max_batch_size=4, max_inflight=2, max_delay_s=10.0)
    batcher.submit(0)  # runner idle: goes alone
    for i in range(1, 4):
        batcher.submit(i)
    assert runner.sizes == [1]  # 3 queued, below max_batch_size, runner busy
    batcher.submit(4)
    assert runner.sizes == [1, 4]  # the 4th fills the batch: handed over without waiting


def test_partial_batch_goes_after_max_delay_when_a_slot_is_free() -> None:
    batcher, runner, clock = make(max_batch_size=8, max_inflight=2, max_delay_s=0.010)
    batcher.submit(0)
    clock.advance(0.002)
    batcher.submit(1)
    batcher.submit(2)
    clock.advance(0.0099)  # the oldest queued item has waited 9.9 ms
    assert runner.sizes == [1]
    clock.advance(0.0002)  # now 10.1 ms
    assert runner.sizes == [1, 2]


def test_max_inflight_caps_batches_handed_over() -> None:
    batcher, runner, clock = make(max_batch_size=2, max_inflight=2)
    for i in range(7):
        batcher.submit(i)
    clock.advance(0.5)
    assert len(runner.pending) == 2
    assert batcher.inflight == 2
    runner.complete()
    assert len(runner.pending) == 2
    assert runner.sizes == [1, 2, 2]


def test_a_full_batch_goes_one_ahead_of_max_inflight() -> None:
    batcher, runner, clock = make(max_batch_size=2, full_batch_ahead=True)
    batcher.submit(0)  # runner idle: goes alone
    batcher.submit(1)
    clock.advance(0.5)
    assert runner.sizes == [1]  # a partial batch waits for the runner, however long
    batcher.submit(2)  # full: handed over while the first still runs
    assert runner.sizes == [1, 2] and batcher.inflight == 2
    batcher.submit(3)
    batcher.submit(4)
    assert runner.sizes == [1, 2]  # never more than one ahead
    runner.complete()
    assert runner.sizes == [1, 2, 2]


def test_a_batch_handed_over_ahead_is_timed_from_when_the_runner_could_start_it() -> None:
    batcher, runner, clock = make(max_batch_size=2, full_batch_ahead=True)
    for i in range(5):
        batcher.submit(i)  # 1 alone, then a full batch of 2 ahead of it
    for _ in range(30):
        clock.advance(0.1)
        runner.complete()  # each batch takes 0.1 s once the runner starts it
        batcher.submit(0)
        batcher.submit(1)
    # Timed from their hand-over, batches waiting ahead would look twice as long.
    assert batcher.images_per_s() == pytest.approx(2 / 0.1, rel=0.01)


def test_without_full_batch_ahead_the_runner_takes_one_batch_at_a_time() -> None:
    batcher, runner, _clock = make(max_batch_size=2)
    for i in range(5):
        batcher.submit(i)
    assert runner.sizes == [1] and batcher.inflight == 1


def test_results_reach_their_own_deferreds_in_order() -> None:
    batcher, runner, _clock = make()
    first = batcher.submit(10)
    rest = [batcher.submit(i) for i in (20, 30, 40)]
    runner.complete(lambda x: x * 2)
    runner.complete(lambda x: x + 1)
    assert result_of(first) == 20
    assert [result_of(d) for d in rest] == [21, 31, 41]


def test_full_queue_rejects_at_once_with_retry_after() -> None:
    batcher, runner, _clock = make(max_queue=2)
    batcher.submit(0)  # in flight, not queued
    batcher.submit(1)
    batcher.submit(2)
    rejected = batcher.submit(3)
    failure = result_of(rejected)
    assert isinstance(failure, Failure)
    assert failure.check(Overloaded)
    assert failure.value.retry_after_s >= 1
    runner.complete()
    assert runner.sizes == [1, 2]  # the rejected item never reached the runner


def test_queued_item_expires_at_its_deadline_and_never_reaches_runner() -> None:
    batcher, runner, clock = make(timeout_s=0.5)
    batcher.submit(0)  # occupies the runner
    late = batcher.submit(1)
    clock.advance(0.499)
    assert not has_fired(late)
    clock.advance(0.002)
    failure = result_of(late)
    assert failure.check(DeadlineExceeded)
    assert batcher.queued == 0
    runner.complete()
    assert runner.sizes == [1]  # nothing left to run


def test_item_in_flight_fails_at_deadline_and_late_result_is_dropped() -> None:
    batcher, runner, clock = make(timeout_s=0.5)
    d = batcher.submit(7)
    clock.advance(0.6)
    assert result_of(d).check(DeadlineExceeded)
    runner.complete()  # must not raise AlreadyCalledError
    assert batcher.inflight == 0


def test_per_submission_timeout_overrides_policy() -> None:
    batcher, _runner, clock = make(timeout_s=10.0)
    batcher.submit(0)
    d = batcher.submit(1, timeout_s=0.1)
    clock.advance(0.11)
    assert result_of(d).check(DeadlineExceeded)


def test_cancelled_queued_item_is_removed_before_the_runner() -> None:
    batcher, runner, _clock = make()
    batcher.submit(0)
    keep = batcher.submit(1)
    gone = batcher.submit(2)
    gone.cancel()
    assert result_of(gone).check(CancelledError)
    assert batcher.queued == 1
    runner.complete()
    assert runner.batches[1].payloads == [1]
    runner.complete()
    assert result_of(keep) == 1


def test_item_cancelled_after_handover_is_not_live_when_batch_starts() -> None:
    batcher, runner, _clock = make(max_inflight=2, max_batch_size=2)
    batcher.submit(0)
    a = batcher.submit(1)
    b = batcher.submit(2)  # full batch of 2: handed over while the first runs
    assert runner.sizes == [1, 2]
    b.cancel()
    assert runner.batches[1].live_indices() == [0]
    runner.complete()
    runner.complete()
    assert result_of(a) == 1
    assert result_of(b).check(CancelledError)


def test_a_frozen_batch_skips_what_was_dropped_before_its_runner_starts_it() -> None:
    # What the inference thread gets: a batch handed over ahead waits behind another, and
    # an image cancelled (or past its deadline) meanwhile is not computed.
    batcher, runner, _clock = make(max_inflight=2, max_batch_size=2)
    batcher.submit(0)
    a = batcher.submit(1)
    b = batcher.submit(2)
    frozen = runner.batches[1].frozen()
    b.cancel()
    assert frozen.live_indices() == [0] and frozen.payloads == [1, 2]
    runner.complete()
    runner.complete()
    assert result_of(a) == 1 and result_of(b).check(CancelledError)


def test_an_item_dropped_before_freezing_stays_dropped() -> None:
    batcher, runner, _clock = make(max_inflight=2, max_batch_size=2)
    batcher.submit(0)
    batcher.submit(1)
    batcher.submit(2).cancel()
    assert runner.batches[1].frozen().live_indices() == [0]


def test_failed_batch_fails_only_its_items_and_next_batch_runs() -> None:
    batcher, runner, _clock = make()
    first = batcher.submit(0)
    second = batcher.submit(1)
    runner.fail(InferenceFailed("boom"))
    assert result_of(first).check(InferenceFailed)
    assert not has_fired(second)
    assert runner.sizes == [1, 1]
    runner.complete()
    assert result_of(second) == 1


def test_runner_giving_wrong_number_of_results_fails_the_batch() -> None:
    class ShortRunner:
        def run(self, batch: Batch[int]) -> Deferred[Sequence[int | None]]:
            d: Deferred[Sequence[int | None]] = Deferred()
            d.callback([])
            return d

    batcher: Batcher[int, int] = Batcher(ShortRunner(), BatchPolicy(), Clock())
    assert result_of(batcher.submit(1)).check(InferenceFailed)


def stack_depth() -> int:
    frame, depth = inspect.currentframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def test_synchronous_runner_drains_a_long_queue_at_a_constant_stack_depth() -> None:
    class EchoRunner:
        """Holds the first batch until the test fires it; answers the rest synchronously."""

        def __init__(self) -> None:
            self.first: Deferred[Sequence[int | None]] | None = None
            self.first_payloads: list[int] = []
            self.depths: list[int] = []

        def run(self, batch: Batch[int]) -> Deferred[Sequence[int | None]]:
            d: Deferred[Sequence[int | None]] = Deferred()
            if self.first is None:
                self.first, self.first_payloads = d, list(batch.payloads)
                return d
            self.depths.append(stack_depth())
            d.callback(list(batch.payloads))
            return d

    runner = EchoRunner()
    batcher: Batcher[int, int] = Batcher(
        runner, BatchPolicy(max_batch_size=4, max_queue=4000, full_batch_ahead=False), Clock()
    )
    results = [batcher.submit(i) for i in range(3000)]
    assert batcher.queued == 2999
    assert runner.first is not None
    runner.first.callback(runner.first_payloads)  # the other 750 batches run from here
    assert [result_of(d) for d in results] == list(range(3000))
    assert len(runner.depths) == 750
    assert set(runner.depths) == {runner.depths[0]}  # each batch starts from the same frame
    assert batcher.queued == 0 and batcher.inflight == 0


class RecordingObserver:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.waits: list[float] = []
        self.queue: list[int] = []
        self.rejections: list[str] = []

    def queue_size(self, items: int) -> None:
        self.queue.append(items)

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        self.sizes.append(size)
        self.waits.extend(waits_s)

    def item_rejected(self, reason: str) -> None:
        self.rejections.append(reason)


def test_observer_sees_batch_sizes_queue_waits_and_rejections() -> None:
    clock = Clock()
    runner: FakeRunner[int] = FakeRunner()
    observer = RecordingObserver()
    batcher: Batcher[int, int] = Batcher(
        runner, BatchPolicy(max_queue=2, timeout_s=1.0), clock, observer
    )
    batcher.submit(0)
    batcher.submit(1)
    clock.advance(0.25)
    batcher.submit(2)
    batcher.submit(3)  # queue full
    runner.complete()
    assert observer.sizes == [1, 2]
    assert observer.waits == pytest.approx([0.0, 0.25, 0.0])
    assert observer.rejections == ["queue_full"]
    assert observer.queue[-1] == 0


def test_the_queue_shortens_when_its_wait_would_pass_half_the_deadline() -> None:
    batcher, runner, clock = make(max_batch_size=2, max_queue=1000, timeout_s=10.0)
    batcher.submit(0)
    clock.advance(2.0)
    runner.complete()  # one image took 2 s: 0.42 s an image (0.8 x 0.025 + 0.2 x 2)
    batcher.check_room(50)  # nothing ahead: its own images are its own wait
    batcher.submit(0)  # in flight
    for i in range(10):
        batcher.submit(i)
    batcher.check_room(1)  # (1 in flight + 10 queued) x 0.42 s = 4.6 s: within 5 s
    batcher.submit(10)
    with pytest.raises(Overloaded) as refused:  # 12 x 0.42 s = 5.0 s, past half of 10 s
        batcher.check_room(1)
    assert "11 images wait about 5.0 s of the 10 s deadline" in str(refused.value)
    assert refused.value.retry_after_s == 3  # ceil((11 / 2 + 1) batches x 0.44 s)
    runner.complete()  # a batch is done and the next goes: room again
    batcher.check_room(1)
    with pytest.raises(Overloaded, match="of the 4 s deadline"):  # its own, shorter one
        batcher.check_room(1, timeout_s=4.0)
    batcher.check_room(1, timeout_s=60.0)  # a longer one than the server's: the server's


def test_a_batch_in_flight_counts_its_images_not_a_whole_batch_time() -> None:
    # Batches of 32 at 0.3 s against a 0.9 s deadline: one image queued behind a batch in
    # flight waits ~0.3 s, and is admitted (two whole batch times would be 0.6 s).
    batcher, runner, clock = make(max_batch_size=32, max_queue=1000, timeout_s=0.9)
    batcher.submit(-1)  # alone in flight; each round's 32 queue behind, then run 0.3 s
    for _ in range(12):
        for i in range(32):
            batcher.submit(i)
        runner.complete()
        clock.advance(0.3)
    assert runner.sizes[-1] == 32 and batcher.inflight == 1
    batcher.submit(0)
    batcher.check_room(1)  # 33 images at ~0.01 s: ~0.3 s, under half of 0.9 s


def test_retry_after_grows_with_the_queue() -> None:
    batcher, runner, clock = make(max_batch_size=2, max_queue=1000, timeout_s=10.0)
    batcher.submit(0)
    clock.advance(2.0)
    runner.complete()  # one batch took 2 s
    # The time to drain the queue: (queued / max_batch_size + batches in flight) x the
    # moving average of a batch (0.8 x 0.05 s + 0.2 x 2 s = 0.44 s), rounded up.
    batcher.submit(0)  # in flight
    assert batcher.retry_after_s() == 1  # ceil(1 x 0.44)
    for i in range(10):
        batcher.submit(i)
    assert batcher.retry_after_s() == 3  # ceil(6 x 0.44)
    for i in range(90):
        batcher.submit(i)
    assert batcher.retry_after_s() == 23  # ceil(51 x 0.44)


def test_released_batch_frees_its_slot_before_its_results_arrive() -> None:
    batcher, runner, _clock = make(max_batch_size=4)
    first = batcher.submit(0)
    batcher.submit(1)
    assert runner.sizes == [1]
    runner.batches[0].free()  # e.g. the model is done, the store stage runs
    assert runner.sizes == [1, 1]  # the next batch went at once
    assert not first.called
    runner.complete()
    assert result_of(first) == 0
    assert batcher.inflight == 1  # the slot is given back once, not again at completion


def test_a_cancelled_release_frees_the_slot_once_too() -> None:
    batcher, runner, _clock = make(max_batch_size=4)
    first = batcher.submit(0)
    batcher.submit(1)
    runner.batches[0].runner_free.cancel()  # a runner that gives up on its signal
    assert runner.sizes == [1, 1]  # the slot was freed all the same
    runner.batches[0].free()  # a late signal changes nothing
    runner.complete()
    assert result_of(first) == 0
    assert batcher.inflight == 1


def test_a_failure_result_fails_only_that_item() -> None:
    batcher, runner, _clock = make()
    batcher.submit(0)
    ok, bad = batcher.submit(1), batcher.submit(2)
    runner.complete()
    runner.complete(lambda x: Failure(InferenceFailed("disk full")) if x == 2 else x)
    assert result_of(ok) == 1
    assert result_of(bad).check(InferenceFailed)


def test_batch_map_keeps_liveness() -> None:
    batcher, runner, _clock = make(max_inflight=2, max_batch_size=2)
    batcher.submit(0)
    batcher.submit(1)
    dropped = batcher.submit(2)
    dropped.cancel()
    assert result_of(dropped).check(CancelledError)
    mapped = runner.batches[1].map(lambda x: x * 10)
    assert mapped.payloads == [10, 20] and mapped.live_indices() == [0]


def test_retry_after_is_at_least_one_second_before_any_batch_has_finished() -> None:
    batcher, _runner, _clock = make(max_batch_size=4)
    for i in range(9):
        batcher.submit(i)
    # 8 queued and 1 in flight: (8 / 4 + 1) x the initial 0.05 s = 0.15 s, rounded up.
    assert (batcher.queued, batcher.inflight) == (8, 1)
    assert batcher.retry_after_s() == 1


def test_overloaded_carries_the_retry_after_of_batches_timed_on_the_clock() -> None:
    batcher, runner, clock = make(max_batch_size=4, max_queue=10, timeout_s=60.0)
    clock.advance(10.0)
    batcher.submit(0)
    clock.advance(5.0)
    runner.complete()  # started at 10 s, ended at 15 s: 0.8 x 0.05 + 0.2 x 5 = 1.04 s
    batcher.submit(1)
    clock.advance(5.0)
    runner.complete()  # another 5 s batch: 0.8 x 1.04 + 0.2 x 5 = 1.832 s
    batcher.submit(2)  # in flight
    for i in range(9):
        batcher.submit(i)
    batcher.check_room(1)  # exactly one place left: no rejection
    batcher.submit(9)
    # (10 queued / 4 + 1 in flight) x 1.832 s = 6.41 s, rounded up.
    assert batcher.retry_after_s() == 7
    rejected = result_of(batcher.submit(10))
    assert rejected.check(Overloaded) and rejected.value.retry_after_s == 7
    with pytest.raises(Overloaded) as refused:
        batcher.check_room(1)
    assert refused.value.retry_after_s == 7


def test_item_expiring_while_its_batch_runs_is_not_live_and_the_rest_get_results() -> None:
    batcher, runner, clock = make(max_batch_size=2, max_inflight=2, timeout_s=1.0)
    batcher.submit(0)
    late = batcher.submit(1, timeout_s=0.1)
    kept = batcher.submit(2)  # a full batch of 2, handed over at once
    assert runner.sizes == [1, 2]
    clock.advance(0.2)
    assert result_of(late).check(DeadlineExceeded)
    assert runner.batches[1].live_indices() == [1]
    runner.complete()
    runner.complete(lambda x: x * 10)  # would raise AlreadyCalledError if `late` were live
    assert result_of(kept) == 20
    assert batcher.inflight == 0


def test_delivered_and_failed_items_leave_no_deadline_timers_behind() -> None:
    batcher, runner, clock = make(timeout_s=1.0)
    done = batcher.submit(0)
    failed = batcher.submit(1)
    runner.complete()
    runner.fail(InferenceFailed("boom"))
    assert result_of(done) == 0 and result_of(failed).check(InferenceFailed)
    assert clock.getDelayedCalls() == []


def test_cancelling_the_first_item_of_a_running_batch_delivers_the_others_at_once() -> None:
    batcher, runner, _clock = make(max_batch_size=3, timeout_s=1.0)
    batcher.submit(0)
    first, second, third = batcher.submit(1), batcher.submit(2), batcher.submit(3)
    runner.complete()
    assert runner.sizes == [1, 3]
    first.cancel()
    runner.complete(lambda x: x * 10)
    assert [result_of(second), result_of(third)] == [20, 30]  # now, not at their deadline


def test_cancelling_the_first_item_of_a_failing_batch_fails_the_others_at_once() -> None:
    batcher, runner, _clock = make(max_batch_size=3, timeout_s=1.0)
    batcher.submit(0)
    first, second, third = batcher.submit(1), batcher.submit(2), batcher.submit(3)
    runner.complete()
    first.cancel()
    runner.fail(InferenceFailed("boom"))
    assert result_of(second).check(InferenceFailed)
    assert result_of(third).check(InferenceFailed)


def test_runner_skipping_a_live_item_fails_that_item_and_delivers_the_rest() -> None:
    batcher, runner, _clock = make(max_batch_size=3)
    batcher.submit(0)
    ok, skipped, also_ok = batcher.submit(1), batcher.submit(2), batcher.submit(3)
    runner.complete()
    runner.complete(lambda x: None if x == 2 else x * 10)
    assert result_of(ok) == 10 and result_of(also_ok) == 30
    assert result_of(skipped).check(InferenceFailed)


def test_observer_sees_each_rejection_reason_and_the_queue_after_cancel_and_expiry() -> None:
    clock = Clock()
    runner: FakeRunner[int] = FakeRunner()
    observer = RecordingObserver()
    batcher: Batcher[int, int] = Batcher(
        runner, BatchPolicy(max_queue=3, timeout_s=1.0), clock, observer
    )
    batcher.submit(0)  # in flight
    cancelled = batcher.submit(1)
    batcher.submit(2, timeout_s=0.5)
    batcher.submit(3)
    batcher.submit(4)  # queue full
    cancelled.cancel()
    assert observer.queue[-1] == batcher.queued == 2
    clock.advance(0.6)
    assert observer.queue[-1] == batcher.queued == 1
    batcher.count_rejection("too_many_images")
    assert observer.rejections == ["queue_full", "cancelled", "deadline", "too_many_images"]
