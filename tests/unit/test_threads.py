"""Thread names the kernel knows (Linux): what top -H and the bench's per-thread CPU see."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from batchserve.serving.threads import KernelNamedThread, NamedThreadPool

T = TypeVar("T")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def kernel_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_thread_carries_its_name_into_the_kernel_cut_to_15_bytes() -> None:
    seen: list[str] = []
    thread = KernelNamedThread(
        target=lambda: seen.append(kernel_name(threading.get_native_id())),
        name="batchserve-inference",
    )
    thread.start()
    thread.join()
    assert seen == ["batchserve-infe"]


def on_a_pool_thread(pool: NamedThreadPool, fn: Callable[[int], T]) -> T:
    """``fn(native thread id)`` run once on one of ``pool``'s threads."""
    seen: list[T] = []
    done = threading.Event()

    def record() -> None:
        seen.append(fn(threading.get_native_id()))
        done.set()

    pool.start()
    try:
        pool.callInThread(record)
        assert done.wait(10)
    finally:
        pool.stop()
    return seen[0]


def test_the_pool_threads_are_known_by_the_pool_name() -> None:
    pool = NamedThreadPool(2, 2, name="batchserve-decode")
    assert on_a_pool_thread(pool, kernel_name) == "batchserve-deco"


def test_a_pool_can_run_its_threads_below_the_process_priority() -> None:
    pool = NamedThreadPool(1, 1, name="batchserve-decode", nice=5)
    nice = on_a_pool_thread(pool, lambda tid: os.getpriority(os.PRIO_PROCESS, tid))
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < nice  # not ours
