"""bench/results.json: every measurement, one section per scenario, each with the date, the
machine and the command that produced it. The only source RESULTS.md and the README's
numbers are rendered from (``bench/report/render.py``)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

RESULTS_JSON = Path(__file__).parents[1] / "results.json"

#: The order of the sections in results.json and in RESULTS.md.
SECTIONS = (
    "limit",
    "embed",
    "low_load",
    "search",
    "bulk",
    "bulk_engines",
    "retrieval",
    "kinds",
    "ceiling",
    "train",
    "overload",
    "frontend",
    "workers",
    "versus",
    "backends",
    "precision",
    "device",
    "replica_start",
    "cluster",
    "writers",
)

Section = dict[str, Any]


def machine() -> str:
    """Cores, CPU model and Python version of this machine, as RESULTS.md quotes it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, no GPU"


def default_backend() -> str:
    """What a server started without ``--backend`` runs the model on here."""
    from batchserve.models.spec import ModelSpec, chosen_backend

    return chosen_backend(ModelSpec())


def default_edges() -> int:
    """Edge processes a server started without ``--workers`` runs with here (0: none)."""
    from batchserve.config import ServerSettings

    return ServerSettings().edge_count()


#: Options that say only where results are written: left out of the recorded command.
OUTPUT_OPTIONS = ("--results", "--out", "--readme")


def command(argv: list[str]) -> str:
    """The command line that was run, as a reader would type it, without output paths."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in OUTPUT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in OUTPUT_OPTIONS)):
            kept.append(arg)
    return shlex.join(["python", "-m", "bench", *kept])


def provenance(argv: list[str]) -> Section:
    """Date, machine and command of a measurement taken now."""
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command(argv)}


def load(path: Path = RESULTS_JSON) -> dict[str, Section]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def save(data: dict[str, Section], path: Path = RESULTS_JSON) -> None:
    """Write the sections in their fixed order (unknown ones last), atomically."""
    ordered = {name: data[name] for name in SECTIONS if name in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(ordered, indent=1) + "\n")
    temporary.replace(path)


def record(path: Path, name: str, argv: list[str], numbers: Section) -> Section:
    """Put the section ``name`` (``numbers`` plus date, machine and command) into the file
    at ``path``, in place of the one measured before; return it."""
    data = load(path)
    data[name] = {**provenance(argv), **numbers}
    save(data, path)
    return data[name]
