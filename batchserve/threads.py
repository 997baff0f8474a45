"""Threads that carry their name into the kernel, so that ``top -H``, ``ps -L`` and
/proc/<pid>/task/*/comm tell the reactor, the decode pool, the index thread and the model's
thread apart (Python names its threads only for itself). Linux only; elsewhere, and for
names the kernel refuses, the thread runs unnamed."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any

from twisted.python.threadpool import ThreadPool

#: prctl's option to set the calling thread's name (at most 15 bytes are kept).
_PR_SET_NAME = 15

_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def name_this_thread(name: str) -> bool:
    """Give the calling thread ``name`` in the kernel (its first 15 bytes); whether it took."""
    if _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0)


class KernelNamedThread(threading.Thread):
    """A ``threading.Thread`` that names itself in the kernel once it runs. Twisted's pool
    names its threads "PoolThread-<pool>-<n>"; the kernel keeps 15 bytes, which should say
    which pool ("batchserve-deco")."""

    def run(self) -> None:
        name_this_thread(self.name.removeprefix("PoolThread-"))
        super().run()


class NamedThreadPool(ThreadPool):
    """A Twisted ThreadPool whose threads the kernel knows by the pool's name."""

    threadFactory = KernelNamedThread  # noqa: N815 (Twisted API)
