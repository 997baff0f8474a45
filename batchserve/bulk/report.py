"""What a bulk index did, as both engines report it: counts, failures, the busy time of each
stage, the progress line while it runs and the summary when it ends."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

STAGES = ("read+decode", "embed", "write", "index")


@dataclass
class BulkReport:
    """What a bulk index did: counts, failures (location, reason), wall seconds, and the
    busy seconds of each stage (summed over threads, tasks or actors)."""

    indexed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    nodes: int = 1

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        """The report as ``--report`` writes it."""
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "failed": [{"path": path, "reason": reason} for path, reason in self.failed],
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
            "stage_s": {name: round(s, 3) for name, s in self.stage_s.items()},
            "nodes": self.nodes,
        }


class Progress:
    """A one-line progress report with images/s, redrawn at most twice a second. Its rate
    counts from ``start`` (the model loaded, the job begun), as the summary's does."""

    def __init__(
        self, out: TextIO, total: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._total = total
        self._clock = clock
        self._started = clock()
        self._shown = 0.0

    def start(self) -> None:
        """The job begins now: images/s counts from here."""
        self._started = self._clock()

    def update(self, report: BulkReport, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._shown < 0.5:
            return
        self._shown = now
        rate = report.indexed / max(now - self._started, 1e-9)
        done = report.indexed + report.skipped + len(report.failed)
        total = f"/{self._total}" if self._total else ""
        self._out.write(
            f"\r{done}{total} files: {report.indexed} indexed, {report.skipped} already "
            f"present, {len(report.failed)} failed, {rate:.0f} images/s"
        )
        self._out.flush()


def print_summary(report: BulkReport, out: TextIO = sys.stderr, limit: int = 20) -> None:
    """The final report: counts, rate, busy seconds per stage, then the failures."""
    out.write(
        f"\nindexed {report.indexed} images in {report.seconds:.1f} s "
        f"({report.images_per_s:.0f} images/s); {report.skipped} already present; "
        f"{len(report.failed)} failed\n"
    )
    stages = ", ".join(f"{name} {s:.1f} s" for name, s in report.stage_s.items())
    nodes = f" on {report.nodes} nodes" if report.nodes > 1 else ""
    out.write(f"  busy time per stage{nodes}: {stages}\n")
    for path, reason in report.failed[:limit]:
        out.write(f"  failed: {path}: {reason}\n")
    if len(report.failed) > limit:
        out.write(f"  ... and {len(report.failed) - limit} more\n")
