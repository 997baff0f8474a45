"""Decode turns: first come, first served, image by image."""

from __future__ import annotations

import threading
from collections.abc import Callable

from batchserve.serving.turns import DecodeTurns


def until(condition: Callable[[], bool]) -> None:
    """Spin (no sleep) until another thread has got as far as ``condition`` says."""
    for _ in range(10_000_000):
        if condition():
            return
    raise AssertionError("the other thread never got there")


def test_a_turn_given_back_goes_to_the_longest_waiter_so_requests_interleave() -> None:
    turns = DecodeTurns(1)
    decoded: list[str] = []

    def request(name: str, images: int) -> threading.Thread:
        def decode() -> None:
            for _ in range(images):
                with turns.turn():
                    decoded.append(name)

        thread = threading.Thread(target=decode)
        thread.start()
        return thread

    with turns.turn():  # an image decoding: both requests below wait
        slow = request("slow", 3)
        until(lambda: turns.waiting == 1)
        ordinary = request("ordinary", 1)
        until(lambda: turns.waiting == 2)
    slow.join(10)
    ordinary.join(10)
    # The slow request's second image queues behind the ordinary one's first.
    assert decoded == ["slow", "ordinary", "slow", "slow"]


def test_as_many_decode_at_once_as_there_are_turns() -> None:
    turns = DecodeTurns(2)
    third_decoded = threading.Event()

    def third() -> None:
        with turns.turn():
            third_decoded.set()

    with turns.turn(), turns.turn():
        waiter = threading.Thread(target=third)
        waiter.start()
        until(lambda: turns.waiting == 1)
        assert not third_decoded.is_set()
    waiter.join(10)
    assert third_decoded.is_set() and turns.waiting == 0


def test_a_waiter_told_to_stop_leaves_the_line_and_takes_no_turn() -> None:
    turns = DecodeTurns(1, poll_s=0.001)
    hung_up = threading.Event()
    gave_up: list[BaseException] = []

    def stop() -> None:
        if hung_up.is_set():
            raise TimeoutError("the client hung up")

    def wait() -> None:
        try:
            with turns.turn(stop):
                raise AssertionError("never its turn")
        except TimeoutError as e:
            gave_up.append(e)

    with turns.turn():
        waiter = threading.Thread(target=wait)
        waiter.start()
        until(lambda: turns.waiting == 1)
        hung_up.set()
        waiter.join(10)
        assert turns.waiting == 0 and len(gave_up) == 1
    with turns.turn():  # the turn given back is free: nobody holds it
        pass
