"""``batchserve serve`` that cannot start, run as a user runs it: it says why in one line,
exits non-zero at once, and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def serve(*args: str, timeout_s: float = 120.0) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--no-demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return done, time.monotonic() - started


def test_a_taken_port_is_one_line_naming_it_at_once_and_no_data_dir(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = tmp_path / "data"
        done, seconds = serve("--port", str(port), "--data-dir", str(data_dir), timeout_s=60)
    assert done.returncode != 0 and seconds < 10, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"batchserve: 127.0.0.1:{port} is in use: pass --port N, or --port 0 for any free port"
    ], done.stderr
    assert not data_dir.exists()


def test_a_model_that_does_not_load_leaves_no_data_dir_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    missing = tmp_path / "nowhere.keras"
    done, _ = serve("--port", "0", "--data-dir", str(data_dir), "--model", str(missing))
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "cannot start" in done.stdout + done.stderr
    assert not data_dir.exists()  # a rerun with the right model starts afresh


def test_a_keras_application_offline_says_where_its_weights_go(tmp_path: Path) -> None:
    # This machine reaches no network (nor does CI's): the download fails as it would for
    # a user offline. A Keras cache of its own, so that no weights cached earlier are found.
    data_dir = tmp_path / "data"
    environ = {**os.environ, "KERAS_HOME": str(tmp_path / "keras")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--no-demo", "--port", "0",
         "--data-dir", str(data_dir), "--model", "keras:EfficientNetB0"],
        capture_output=True, text=True, timeout=300, env=environ,
    )  # fmt: skip
    assert done.returncode != 0, (done.stdout, done.stderr, time.monotonic() - started)
    said = done.stdout + done.stderr
    assert "keras:EfficientNetB0 needs its ImageNet weights" in said, said
    assert "--weights PATH" in said and "--model builtin" in said
    assert not data_dir.exists()


def test_edges_that_cannot_start_stop_the_server_with_why(tmp_path: Path) -> None:
    # Every edge process dies at once, as one would with a broken install.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import sys\n"
        "if 'batchserve.workers.edge_main' in sys.orig_argv:\n"
        "    sys.exit('this edge cannot start')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(broken)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "batchserve.cli", "serve", "--no-demo", "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--workers", "1"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "this edge cannot start" in log
    assert "cannot start: edge 0 exited with status 1 before it served, 3 times" in log
    assert time.monotonic() - started < 60
