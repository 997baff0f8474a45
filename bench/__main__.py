"""python -m bench: load-test a batchserve deployment, or measure and render bench/RESULTS.md
(bench/commands.py). ``python -m bench device`` measures the GPU path on a lent machine that
has none of the other commands' packages until it installs them: it is dispatched before
they are imported (bench/device_command.py)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["device"]:
        from bench.device_command import main as device

        return device(argv[1:])
    from bench.commands import main as commands

    return commands(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
