"""Two batchserve servers side by side (``python -m bench ab``): settings A against settings
B, or the code of another checkout against this one, each server up for the whole run and
loaded in alternating rounds (A, B, A, B, ...) so that the machine's drift hits both. Prints
the median of the per-pair throughput ratios (A over B) and each side's p99; records nothing
(it answers a tuning question, it is not a published figure)."""

from __future__ import annotations

import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import procs
from bench.scenarios import frontend, versus


@dataclass(frozen=True)
class Side:
    """One server: its extra flags, and the checkout whose ``batchserve`` it runs (None:
    this one)."""

    flags: str = ""
    code: str | None = None

    def start(self, directory: Path, base_flags: list[str]) -> procs.ServerProcess:
        env = {}
        cwd = None
        if self.code:
            # ``python -m`` puts the working directory first on sys.path: run from the data
            # directory, so that PYTHONPATH, not this checkout, supplies the package.
            env["PYTHONPATH"] = str(Path(self.code).resolve())
            cwd = directory
        flags = [*base_flags, *shlex.split(self.flags)]
        return procs.ServerProcess.start(directory, flags, env=env, cwd=cwd)


def measure(
    images: list[bytes],
    a: Side,
    b: Side,
    rounds: int = 4,
    clients: int = 32,
    seconds: float = 8.0,
    tiny_model: bool = False,
) -> dict[str, Any]:
    """``rounds`` pairs of rounds against A then B, with the built-in model, or the front
    end's near-zero-cost model with ``tiny_model``."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-ab-"))
    base = ["--no-demo"]
    if tiny_model:
        model = frontend.build_model_apart(directory / "tiny.keras")
        base += ["--model", str(model), "--embedding-output", "embedding"]
    try:
        first = a.start(directory / "a", base)
        try:
            second = b.start(directory / "b", base)
            try:
                return versus.alternate(first.url, second.url, images, rounds, clients, seconds)
            finally:
                second.stop()
        finally:
            first.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def summary(compared: dict[str, Any], a: Side, b: Side) -> str:
    """What ``measure`` found, in three lines."""
    ours, theirs = compared["batchserve"], compared["baseline"]
    pairs = ", ".join(f"{r:.2f}" for r in compared["ratios"])
    return (
        f"A {a}: median {ours['median_images_per_s']} images/s, p99 {ours['p99_ms']} ms\n"
        f"B {b}: median {theirs['median_images_per_s']} images/s, p99 {theirs['p99_ms']} ms\n"
        f"A / B, median of the per-pair ratios: {compared['median_ratio']:.2f} ({pairs})"
    )
