"""Check that each image's lock file is what pip resolves, and that the GPU image gets one
TensorFlow and one set of CUDA libraries, without Docker, a GPU or installing anything.

For each image (cpu, gpu) it resolves pyproject.toml's dependencies plus the image's extra
with ``pip install --dry-run --report`` for the image's platform (CPython 3.11, manylinux
x86_64 up to glibc 2.36: python:3.11-slim-bookworm), constrained by
``docker/requirements-<image>.txt``, and checks:

- the resolution is that file exactly, wheel for wheel (same names, versions and sha256s):
  the Dockerfiles install the file with ``--no-deps --require-hashes``, so a stale or
  incomplete file would build an image nobody resolved;
- one TensorFlow build and one FAISS build;
- gpu: every ``nvidia-*`` CUDA library for one CUDA major version, the one TensorFlow's
  ``and-cuda`` extra and faiss-gpu were built for, and each library they require present;
  cpu: no ``nvidia-*`` at all.

Usage (needs the package index; pip's configuration files and ``PIP_*`` variables are
ignored so that the check sees what ``docker build`` sees)::

    .venv/bin/python docker/check_resolution.py            # check both lock files
    .venv/bin/python docker/check_resolution.py --write    # re-resolve, rewrite them

Exit status: 0 when every check holds, 1 when one fails (each problem on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("cpu", "gpu")
INDEX_URL = "https://pypi.org/simple"
# The Dockerfiles' base, python:3.11-slim-bookworm: CPython 3.11 on Debian 12 (glibc 2.36).
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36

TENSORFLOW = re.compile(r"(tensorflow|tf-nightly)(-(cpu|gpu|intel|aarch64|macos|rocm|cpu-aws))?")
FAISS = re.compile(r"faiss(-[a-z0-9-]+)?")
REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?")


@dataclass(frozen=True)
class Wheel:
    """One distribution pip chose: canonical name, version, the sha256 of its file, and its
    Requires-Dist lines (markers included)."""

    name: str
    version: str
    sha256: str
    requires: tuple[str, ...] = field(default=(), compare=False)


def canonical(name: str) -> str:
    """A distribution name as the index compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path(image: str) -> Path:
    return ROOT / "docker" / f"requirements-{image}.txt"


def read_lock(text: str) -> dict[str, Wheel]:
    """``name==version --hash=sha256:HEX`` lines (``#`` comments, blank lines and ``\\``
    continuations allowed), keyed by canonical name. Raises ValueError on anything else or a
    name listed twice."""
    wheels: dict[str, Wheel] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match is None:
            raise ValueError(f"not `name==version --hash=sha256:...`: {line!r}")
        name = canonical(match[1])
        if name in wheels:
            raise ValueError(f"{name} is listed twice")
        wheels[name] = Wheel(name, match[2], match[3])
    return wheels


def render_lock(image: str, wheels: Mapping[str, Wheel]) -> str:
    head = (
        f"# What the {image} image installs, exactly: pyproject.toml's dependencies and its\n"
        f'# "{image}" extra, resolved for CPython {PYTHON_VERSION} on manylinux x86_64 '
        f"(python:3.11-slim-bookworm).\n"
        "# The Dockerfile installs it with --no-deps --require-hashes; pip check then proves it\n"
        "# complete. Rewritten by `python docker/check_resolution.py --write`; checked against\n"
        "# the package index by the same script without --write.\n"
    )
    lines = [f"{w.name}=={w.version} --hash=sha256:{w.sha256}" for _, w in sorted(wheels.items())]
    return head + "\n".join(lines) + "\n"


#: Extras an image has besides its own: the CPU image also runs --backend openvino.
ALSO = {"cpu": ("openvino",), "gpu": ()}


def wanted(image: str) -> list[str]:
    """The requirements ``pip install .[image,postgres,ray]`` resolves (the project itself
    aside; the CPU image's with openvino too): every image can serve as a replica on a shared
    PostgreSQL catalog, and run as a node of a Ray cluster for ``batchserve index --engine
    ray``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    also = [requirement for extra in ALSO[image] for requirement in extras[extra]]
    return [*project["dependencies"], *extras[image], *also, *extras["postgres"], *extras["ray"]]


def platforms() -> list[str]:
    """Every manylinux tag a glibc 2.36 x86_64 system accepts (pip does not widen
    ``--platform manylinux_2_36_x86_64`` to the older ones by itself)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def resolve(
    requirements: Sequence[str], pins: Mapping[str, Wheel] | None, index_url: str
) -> dict[str, Wheel]:
    """What pip would install for the image's platform, ``pins`` as constraints."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "pip", "--isolated", "install", "--dry-run",
            "--ignore-installed", "--quiet", "--report", str(report),
            "--index-url", index_url, "--only-binary=:all:",
            "--implementation", "cp", "--python-version", PYTHON_VERSION,
            *(f"--platform={tag}" for tag in platforms()),
        ]  # fmt: skip
        if pins is not None:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("".join(f"{w.name}=={w.version}\n" for w in pins.values()))
            command += ["--constraint", str(constraints)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: the index alone, as in docker build
        done = subprocess.run(
            [*command, *requirements], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unresolved(f"pip could not resolve from {index_url} (it needs the index): {said}")
        installs = json.loads(report.read_text())["install"]
    wheels = {}
    for item in installs:
        meta = item["metadata"]
        sha256 = item["download_info"]["archive_info"]["hashes"]["sha256"]
        name = canonical(meta["name"])
        wheels[name] = Wheel(name, meta["version"], sha256, tuple(meta.get("requires_dist", ())))
    return wheels


def differences(lock: Mapping[str, Wheel], resolved: Mapping[str, Wheel]) -> list[str]:
    """How the lock file differs from the resolution, one line per distribution."""
    lines = []
    for name in sorted(set(lock) | set(resolved)):
        old, new = lock.get(name), resolved.get(name)
        if old is None and new is not None:
            lines.append(f"{name}=={new.version} is resolved but not in the lock file")
        elif new is None and old is not None:
            lines.append(f"{name}=={old.version} is in the lock file but no longer resolved")
        elif old is not None and new is not None and old != new:
            lines.append(
                f"{name}: lock file {old.version} sha256:{old.sha256[:12]}, "
                f"resolution {new.version} sha256:{new.sha256[:12]}"
            )
    return lines


def cuda_major(name: str, specifier: str = "") -> str | None:
    """The CUDA major version of an ``nvidia-*`` distribution: its ``-cuNN`` suffix, or for
    the unsuffixed CUDA 13 wheels the major of the version (or the specifier's lower bound).
    None for anything that is not ``nvidia-*``."""
    if not name.startswith("nvidia-"):
        return None
    suffix = re.search(r"-cu(\d+)$", name)
    if suffix:
        return suffix[1]
    bound = re.search(r"(?:==|>=|~=)\s*(\d+)", specifier)
    return bound[1] if bound else "?"


def cuda_requirements(wheel: Wheel, extra: str = "") -> dict[str, str]:
    """The ``nvidia-*`` libraries ``wheel`` requires (with ``extra``), by name, with the CUDA
    major each is built for."""
    needed = {}
    for line in wheel.requires:
        match = REQUIREMENT.fullmatch(line)
        if match is None:
            continue
        marker = match[4] or ""
        if "extra" in marker and not re.search(rf"""extra\s*==\s*["']{extra}["']""", marker):
            continue
        name = canonical(match[1])
        major = cuda_major(name, match[3])
        if major is not None:
            needed[name] = major
    return needed


def problems(image: str, wheels: Mapping[str, Wheel]) -> list[str]:
    """What breaks the image's one-TensorFlow, one-FAISS, one-CUDA rule, one line each, from
    names and versions alone (so a lock file can be checked without the index)."""
    found = []
    tensorflows = [w for w in wheels.values() if TENSORFLOW.fullmatch(w.name)]
    faisses = [w for w in wheels.values() if FAISS.fullmatch(w.name)]
    nvidia = cuda_libraries(wheels)
    if len(tensorflows) != 1:
        found.append(f"{len(tensorflows)} TensorFlow builds: {names(tensorflows)}")
    if len(faisses) != 1:
        found.append(f"{len(faisses)} FAISS builds: {names(faisses)}")
    if image == "cpu":
        if nvidia:
            found.append(f"CUDA libraries in the CPU image: {', '.join(sorted(nvidia))}")
        if [w.name for w in faisses] != ["faiss-cpu"]:
            found.append(f"the CPU image's FAISS is {names(faisses)}, not faiss-cpu")
    elif len(set(nvidia.values())) != 1:
        found.append(f"CUDA libraries of {len(set(nvidia.values()))} major versions: {nvidia}")
    return found


def requirement_problems(wheels: Mapping[str, Wheel]) -> list[str]:
    """Whether TensorFlow (with its and-cuda extra) and FAISS are built for the CUDA major
    version of the libraries installed, each library they require present; from the
    Requires-Dist lines of a resolution."""
    found = []
    nvidia = cuda_libraries(wheels)
    for wheel in wheels.values():
        if TENSORFLOW.fullmatch(wheel.name):
            needed = cuda_requirements(wheel, "and-cuda")
        elif FAISS.fullmatch(wheel.name):
            needed = cuda_requirements(wheel)
        else:
            continue
        if not needed:
            found.append(f"{wheel.name} {wheel.version} requires no CUDA libraries")
        for name, major in sorted(needed.items()):
            if name not in nvidia:
                found.append(f"{wheel.name} needs {name}, which is not installed")
            if {major} != set(nvidia.values()):
                found.append(f"{wheel.name} needs {name} for CUDA {major}; installed: {nvidia}")
    return found


def cuda_libraries(wheels: Mapping[str, Wheel]) -> dict[str, str]:
    """The ``nvidia-*`` distributions among ``wheels``, with the CUDA major of each."""
    majors = {w.name: cuda_major(w.name, "==" + w.version) for w in wheels.values()}
    return {name: major for name, major in majors.items() if major is not None}


def names(wheels: Iterable[Wheel]) -> str:
    return ", ".join(f"{w.name} {w.version}" for w in wheels) or "none"


def summary(image: str, wheels: Mapping[str, Wheel]) -> list[str]:
    """The lines a reader checks by eye: TensorFlow, FAISS and the CUDA libraries."""
    lines = [f"{image}: {len(wheels)} distributions"]
    for wheel in sorted(wheels.values(), key=lambda w: w.name):
        if TENSORFLOW.fullmatch(wheel.name) or FAISS.fullmatch(wheel.name):
            majors = set(cuda_requirements(wheel, "and-cuda").values()) if image == "gpu" else ()
            built = f" (for CUDA {', '.join(sorted(majors))})" if majors else ""
            lines.append(f"  {wheel.name} {wheel.version}{built}")
    for wheel in sorted(wheels.values(), key=lambda w: w.name):
        if wheel.name.startswith("nvidia-"):
            lines.append(f"  {wheel.name} {wheel.version}")
    return lines


def check(image: str, index_url: str, write: bool) -> list[str]:
    """Resolve ``image``; print its summary; return its problems (after rewriting its lock
    file, with ``write``)."""
    path = lock_path(image)
    if write:
        resolved = resolve(wanted(image), None, index_url)
        path.write_text(render_lock(image, resolved))
        found = []
    else:
        lock = read_lock(path.read_text())
        resolved = resolve(wanted(image), lock, index_url)
        found = [f"{path.name}: {line}" for line in differences(lock, resolved)]
    print("\n".join(summary(image, resolved)), flush=True)
    found += problems(image, resolved)
    if image == "gpu":
        found += requirement_problems(resolved)
    return [f"{image}: {line}" for line in found]


class Unresolved(Exception):
    """What stops the check before it can compare anything, in one line."""


#: The oldest pip this check reads the report of: 23.2, the one Python 3.11's venv bundles,
#: fails to (a traceback, before); CI runs it on a current pip.
MIN_PIP = (24, 0)


def check_pip() -> None:
    """Unresolved when this interpreter's pip is too old to report what it resolves."""
    from importlib.metadata import version

    found = version("pip")
    numbers = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if numbers < MIN_PIP:
        raise Unresolved(
            f"needs pip {MIN_PIP[0]} or newer to read its resolution (found {found}): "
            f"{sys.executable} -m pip install -U pip"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="cpu or gpu (default: both)")
    parser.add_argument("--write", action="store_true", help="re-resolve; rewrite lock files")
    parser.add_argument("--index-url", default=INDEX_URL, help=f"default {INDEX_URL}")
    args = parser.parse_args(argv)
    if set(args.images) - set(IMAGES):
        parser.error(f"images are {' and '.join(IMAGES)}, not {args.images}")
    args.images = args.images or list(IMAGES)
    try:
        check_pip()
        found = [line for image in args.images for line in check(image, args.index_url, args.write)]
    except Unresolved as e:
        print(f"check_resolution: {e}", file=sys.stderr)
        return 2
    for line in found:
        print(f"check_resolution: {line}", file=sys.stderr)
    if not found:
        print("OK: each image resolves to its lock file; one TensorFlow, one FAISS, one CUDA")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
