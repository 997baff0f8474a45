"""Thread names the kernel knows (Linux): what top -H and the bench's per-thread CPU see."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from batchserve.threads import KernelNamedThread, NamedThreadPool

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


def test_the_pool_threads_are_known_by_the_pool_name() -> None:
    pool = NamedThreadPool(2, 2, name="batchserve-decode")
    names: list[str] = []
    done = threading.Event()

    def record() -> None:
        names.append(kernel_name(threading.get_native_id()))
        done.set()

    pool.start()
    try:
        pool.callInThread(record)
        assert done.wait(10)
    finally:
        pool.stop()
    assert names == ["batchserve-deco"]


def test_a_pool_can_run_its_threads_below_the_process_priority() -> None:
    pool = NamedThreadPool(1, 1, name="batchserve-decode", nice=5)
    seen: list[int] = []
    done = threading.Event()

    def record() -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        done.set()

    pool.start()
    try:
        pool.callInThread(record)
        assert done.wait(10)
    finally:
        pool.stop()
    assert seen == [min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < seen[0]  # not ours
