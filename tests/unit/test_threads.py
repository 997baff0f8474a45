"""Thread names the kernel knows (Linux): what top -H and the bench's per-thread CPU see."""

from __future__ import annotations

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
