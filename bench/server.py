"""Starting a batchserve process for a benchmark, on 127.0.0.1 and a free port."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from batchserve.testing import ServerProcess


def start(args: Sequence[str], timeout_s: float = 300.0) -> ServerProcess:
    """Start ``batchserve serve`` with ``args`` in a fresh temporary data dir."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-"))
    return ServerProcess.start(directory, args, timeout_s)
